"""Exact partition search over an ordered chain of nodes, by dynamic programming.

A plan gives every block to exactly one node, in contiguous slices along the chain
(node 0 holds the input; a node may be skipped, its links then relay the activation), and
picks a codec for every boundary that crosses a link. Its cost is made of *stages*: the
compute stage of each node that runs blocks (decode of what it receives + its blocks +
encode of what it sends) and one stage per link crossed (serialisation time of the frame
plus the per-message overhead; latency adds half the RTT).

Objectives (``evaluate`` is the one definition the DP and the tests share):

- ``latency``: one input end to end, the sum of every stage and one-way link delay;
- ``throughput``: a pipelined chain is bounded by its slowest stage, computation or link
  (DEFER, the Duan thesis), so the DP minimises the bottleneck stage time; RTT does not
  bound a windowed QoS 1 stream, only bandwidth does;
- ``energy``: marginal joules per inference, busy seconds × (active − idle watts) of the
  node that is busy, a link's transfer charged to its sending node.

The DP state is (node t, boundary a it receives, codec of that frame); the value is the
best combination (sum, or max for throughput) of every stage before node t's own. Node t
then picks its last block b and, unless b is the last block, the codec and the next node.
Both combinations are monotone, so keeping the k best values per state gives the exact
top-k (ties aside); top-1 is exact. Transitions are vectorised over (next node, b, codec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Objective = Literal["latency", "throughput", "energy"]
INF = float("inf")


@dataclass
class Problem:
    """Costs for N blocks on T chain nodes and S codecs (NaN-free; ``inf`` = impossible).

    ``comp[t, j]`` seconds of block j+1 on node t; ``mem[t, j]`` its MB; ``allowed[t, j]``;
    ``bytes_[b, s]`` encoded bytes of boundary b with codec s (inf: not eligible there);
    ``enc[t, b, s]`` / ``dec[t, b, s]`` seconds on node t; ``loss[b, s]`` points;
    links ``l`` join nodes l and l+1.
    """

    node_names: list[str]
    codec_names: list[str]
    comp: np.ndarray
    mem: np.ndarray
    allowed: np.ndarray
    mem_cap: np.ndarray
    time_cap: np.ndarray
    power: np.ndarray  # marginal watts per node (active - idle); NaN when unknown
    bytes_: np.ndarray
    enc: np.ndarray
    dec: np.ndarray
    loss: np.ndarray
    bw_bps: np.ndarray
    rtt_s: np.ndarray
    link_cap: np.ndarray  # bytes per inference per link (inf = none)
    overhead: float = 200.0
    min_device_blocks: int = 0
    send_s: np.ndarray | None = None  # per node: seconds per message sent (spool append)
    node_overhead_s: np.ndarray | None = None  # per node running an agent: s per input

    def send_cost(self, t: int) -> float:
        return 0.0 if self.send_s is None else float(self.send_s[t])

    def node_cost(self, t: int) -> float:
        return 0.0 if self.node_overhead_s is None else float(self.node_overhead_s[t])

    @property
    def n_blocks(self) -> int:
        return int(self.comp.shape[1])

    @property
    def n_nodes(self) -> int:
        return int(self.comp.shape[0])

    @property
    def n_codecs(self) -> int:
        return int(self.bytes_.shape[1])


@dataclass(frozen=True)
class Slice:
    node: int
    first: int  # block indices, 1-based; first > last means none (node 0 sending the input)
    last: int


@dataclass(frozen=True)
class Cut:
    boundary: int
    src: int
    dst: int
    codec: int


@dataclass
class Plan:
    slices: tuple[Slice, ...]
    cuts: tuple[Cut, ...]
    value: float = INF
    metrics: dict[str, float] = field(default_factory=dict)
    stages: list[tuple[str, float]] = field(default_factory=list)
    link_bytes: dict[int, float] = field(default_factory=dict)

    def key(self) -> tuple[object, ...]:
        return (tuple((s.node, s.first, s.last) for s in self.slices),
                tuple((c.boundary, c.src, c.dst, c.codec) for c in self.cuts))


def _frame(p: Problem, b: int, s: int) -> float:
    return float(p.bytes_[b, s]) + p.overhead


def _slice_busy(p: Problem, sl: Slice, cin: Cut | None, cout: Cut | None
                ) -> tuple[float, bool]:
    """(busy seconds per input, whether allowed and within memory and time) of a slice."""
    t = sl.node
    blocks = range(sl.first, sl.last + 1)
    busy = sum(float(p.comp[t, j - 1]) for j in blocks) + p.node_cost(t)
    ok = all(p.allowed[t, j - 1] for j in blocks)
    ok = ok and sum(float(p.mem[t, j - 1]) for j in blocks) <= p.mem_cap[t]
    if cin is not None:
        busy += float(p.dec[t, cin.boundary, cin.codec])
    if cout is not None:
        busy += float(p.enc[t, cout.boundary, cout.codec]) + p.send_cost(t)
    return busy, bool(ok and busy <= p.time_cap[t])


def evaluate(p: Problem, plan: Plan) -> Plan:
    """Fill ``metrics`` (latency_s, bottleneck_s, throughput, energy_j, bytes), ``stages``
    and ``link_bytes``; ``metrics['feasible']`` is 0.0 when a constraint is broken."""
    ok = True
    stages: list[tuple[str, float]] = []
    latency = energy = 0.0
    link_bytes: dict[int, float] = {}
    incoming = {c.dst: c for c in plan.cuts}
    outgoing = {c.src: c for c in plan.cuts}
    covered = []
    for sl in plan.slices:
        t = sl.node
        covered += list(range(sl.first, sl.last + 1))
        busy, fits = _slice_busy(p, sl, incoming.get(t), outgoing.get(t))
        ok = ok and fits
        stages.append((f"node {p.node_names[t]}", busy))
        latency += busy
        energy += busy * float(p.power[t])
    for c in plan.cuts:
        nbytes = float(p.bytes_[c.boundary, c.codec])
        if not np.isfinite(nbytes):
            ok = False
        frame = _frame(p, c.boundary, c.codec)
        for link in range(c.src, c.dst):
            tx = frame * 8.0 / float(p.bw_bps[link])
            link_bytes[link] = frame
            if frame > p.link_cap[link]:
                ok = False
            stages.append((f"link {p.node_names[link]}→{p.node_names[link + 1]}", tx))
            latency += tx + float(p.rtt_s[link]) / 2.0
            energy += tx * float(p.power[link])
    first = plan.slices[0]
    if first.node != 0 or covered != list(range(1, p.n_blocks + 1)):
        ok = False
    if first.last < p.min_device_blocks:
        ok = False
    bottleneck = max((v for _n, v in stages), default=0.0)
    plan.metrics = {
        "latency_s": latency, "bottleneck_s": bottleneck,
        "throughput": 1.0 / bottleneck if bottleneck > 0 else INF, "energy_j": energy,
        "bytes": float(sum(link_bytes.values())), "feasible": 1.0 if ok else 0.0,
        "loss": float(sum(p.loss[c.boundary, c.codec] for c in plan.cuts)),
    }
    plan.stages, plan.link_bytes = stages, link_bytes
    return plan


def objective_value(plan: Plan, objective: Objective) -> float:
    m = plan.metrics
    if not m.get("feasible"):
        return INF
    return {"latency": m["latency_s"], "throughput": m["bottleneck_s"],
            "energy": m["energy_j"]}[objective]


def _link_tables(p: Problem, objective: Objective) -> np.ndarray:
    """``L[t, u, b, s]``: the cost of sending boundary b with codec s from t to u > t."""
    T, N, S = p.n_nodes, p.n_blocks, p.n_codecs
    L = np.full((T, T, N + 1, S), INF)
    frame = p.bytes_ + p.overhead  # (N+1, S)
    for t in range(T):
        acc = np.zeros((N + 1, S)) if objective != "throughput" else np.full((N + 1, S), -INF)
        feasible = np.isfinite(frame)
        for u in range(t + 1, T):
            link = u - 1
            tx = frame * 8.0 / p.bw_bps[link]
            feasible = feasible & (frame <= p.link_cap[link])
            if objective == "latency":
                acc = acc + tx + p.rtt_s[link] / 2.0
            elif objective == "throughput":
                acc = np.maximum(acc, tx)
            else:
                acc = acc + tx * p.power[link]
            L[t, u] = np.where(feasible, acc, INF)
    return L


def solve(p: Problem, objective: Objective = "latency",  # noqa: C901, PLR0912, PLR0915
          top: int = 1) -> list[Plan]:
    """The ``top`` best feasible plans, best first, each evaluated; [] when none exists.

    (One k-best dynamic program over (node, first block, codec) states: its loops share a
    dozen tables, so it stays one function rather than helpers passing them all around.)
    """
    if objective == "energy" and not np.all(np.isfinite(p.power)):
        raise ValueError("the energy objective needs power figures for every node "
                         "(power_active_w in the profile or network.toml)")
    T, N, S, K = p.n_nodes, p.n_blocks, p.n_codecs, max(1, top)
    is_max = objective == "throughput"
    L = _link_tables(p, objective)
    enc_cost = p.enc * (p.power[:, None, None] if objective == "energy" else 1.0)
    # prefix sums per node; a block that is not allowed or not runnable makes a range bad
    bad = ~p.allowed | ~np.isfinite(p.comp)
    comp0 = np.where(bad, 0.0, p.comp)
    pc = np.concatenate([np.zeros((T, 1)), np.cumsum(comp0, axis=1)], axis=1)
    pbad = np.concatenate([np.zeros((T, 1), int), np.cumsum(bad, axis=1)], axis=1)
    pm = np.concatenate([np.zeros((T, 1)), np.cumsum(p.mem, axis=1)], axis=1)
    scale = p.power if objective == "energy" else np.ones(T)
    # k-best tables for states (t, a, s); s == S is "native" (node 0, raw input, local)
    val = np.full((K, T, N + 1, S + 1), INF)
    back = np.full((K, T, N + 1, S + 1, 3), -1, dtype=np.int64)  # (src flat state, rank, b)
    val[0, 0, 0, S] = 0.0
    finals: list[tuple[float, int, int, int, int]] = []  # (value, t, a, s, rank)

    def flat(t: int, a: int, s: int) -> int:
        return (t * (N + 1) + a) * (S + 1) + s

    for t in range(T):
        for a in range(N + 1):
            for s in range(S + 1):
                if not np.isfinite(val[0, t, a, s]):
                    continue
                dec = 0.0 if s == S else float(p.dec[t, a, s])
                b_lo = a if t == 0 else a + 1
                if b_lo > N:
                    continue
                bs = np.arange(b_lo, N + 1)
                busy = dec + p.node_cost(t) + pc[t, bs] - pc[t, a]  # (B,)
                ok = (pbad[t, bs] == pbad[t, a]) & (pm[t, bs] - pm[t, a] <= p.mem_cap[t])
                if t == 0:
                    ok &= bs >= p.min_device_blocks
                # finishing here: b == N, no encode
                if ok[-1] and bs[-1] == N and busy[-1] <= p.time_cap[t]:
                    stage = busy[-1] * scale[t]
                    for k in range(K):
                        pre = val[k, t, a, s]
                        if not np.isfinite(pre):
                            break
                        finals.append((max(pre, stage) if is_max else pre + stage,
                                       t, a, s, k))
                if t == T - 1:
                    continue
                sb = bs[bs < N]
                if sb.size == 0:
                    continue
                nb = sb.size
                send = p.send_cost(t)  # durable spool append of the relayed frame
                busy_s = busy[:nb, None] + p.enc[t, sb, :] + send  # (B, S)
                stage = busy[:nb, None] * scale[t] + enc_cost[t, sb, :] + send * scale[t]
                stage = np.where(ok[:nb, None] & (busy_s <= p.time_cap[t]), stage, INF)
                links = L[t][t + 1:][:, sb, :]  # (U, B, S)
                for k in range(K):
                    pre = val[k, t, a, s]
                    if not np.isfinite(pre):
                        break
                    if is_max:
                        cand = np.maximum(np.maximum(pre, stage)[None], links)
                    else:
                        cand = pre + stage[None] + links
                    _merge(val, back, cand, t + 1, sb, flat(t, a, s), k, K)
    return _best_plans(p, back, finals, K)


def _best_plans(p: Problem, back: np.ndarray, finals: list[tuple[float, int, int, int, int]],
                K: int) -> list[Plan]:
    """The ``K`` best distinct plans of ``solve``'s final states, evaluated, best first."""
    plans: list[Plan] = []
    seen: set[tuple[object, ...]] = set()
    for value, t, a, s, k in sorted(finals, key=lambda f: f[0]):
        if not np.isfinite(value):
            continue
        plan = _reconstruct(p, back, t, a, s, k, p.n_blocks, p.n_codecs)
        if plan.key() in seen:
            continue
        seen.add(plan.key())
        plan.value = value
        plans.append(evaluate(p, plan))
        if len(plans) >= K:
            break
    return plans


def _merge(val: np.ndarray, back: np.ndarray, cand: np.ndarray, u0: int, sb: np.ndarray,
           src: int, rank: int, K: int) -> None:
    """Insert ``cand[U, B, S]`` into the k-best lists of states (u0+U, sb[B], S)."""
    U, B, S = cand.shape
    view_v = val[:, u0:u0 + U][:, :, sb, :S]  # copies (fancy index): write back below
    view_b = back[:, u0:u0 + U][:, :, sb, :S]
    cv = cand.copy()
    cb = np.empty((U, B, S, 3), dtype=np.int64)
    cb[..., 0], cb[..., 1] = src, rank
    cb[..., 2] = sb[None, :, None]
    changed = False
    for k in range(K):
        better = cv < view_v[k]  # sorted lists: keep bubbling down (no early exit)
        if not better.any():
            continue
        changed = True
        old_v = view_v[k][better]
        old_b = view_b[k][better]
        view_v[k][better] = cv[better]
        view_b[k][better] = cb[better]
        cv[better] = old_v
        cb[better] = old_b
    if changed:
        val[:, u0:u0 + U, sb, :S] = view_v
        back[:, u0:u0 + U, sb, :S] = view_b


def _reconstruct(p: Problem, back: np.ndarray, t: int, a: int, s: int, k: int, N: int,
                 S: int) -> Plan:
    slices = [Slice(t, a + 1, N)]
    cuts: list[Cut] = []
    while not (t == 0 and a == 0 and s == S):
        src, rank, _b = (int(v) for v in back[k, t, a, s])
        st, rem = divmod(src, (N + 1) * (S + 1))
        sa, ss = divmod(rem, S + 1)
        cuts.append(Cut(a, st, t, s))
        slices.append(Slice(st, sa + 1, a))
        t, a, s, k = st, sa, ss, rank
    return Plan(tuple(reversed(slices)), tuple(reversed(cuts)))
