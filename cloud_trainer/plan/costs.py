"""From benchmark records and ``network.toml`` to the planner's cost arrays (``Problem``).

- block time on a node: the median of its record × the node's ``time_scale``; a block its
  record does not cover cannot run there;
- block memory: twice the block file (as ``agent.infer.runtime.check_fit`` counts it) against
  the profile's ``model_memory_mb`` (or the node's ``memory_mb``);
- a codec at a boundary: bytes from any record that measured it (bytes depend on the data,
  not the node), encode time from the sender's record, decode time from the receiver's
  (else the other record's figure × the node's scale); eligible when its measured accuracy
  loss is within the budget, or when it is lossless;
- power: active − idle watts of the profile (or the node's override).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.infer.blockbench import BenchRecord
from agent.infer.profiles import load_profile
from agent.wire.codec import parse_spec
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.plan.network import NetworkConfig, NodeSpec
from cloud_trainer.plan.solver import INF, Problem


class PlanError(KnetTrainerError, ValueError):
    """Records and network that cannot be planned; the text says what is missing."""


@dataclass(frozen=True)
class Overrides:
    """Command-line constraints on top of ``[constraints]`` and the nodes' own fields."""

    min_device_blocks: int | None = None
    accuracy_budget: float | None = None
    pins: tuple[tuple[int, str], ...] = ()
    forbids: tuple[tuple[int, str], ...] = ()
    max_upload_bytes: tuple[tuple[str, int], ...] = ()  # (link source node or "*", bytes)
    max_node_time: tuple[tuple[str, float], ...] = ()
    codecs: tuple[str, ...] | None = None


def record_for(node: NodeSpec, records: Sequence[BenchRecord]) -> BenchRecord:
    """The node's record: its own file, the record of its ``device``, or of its profile."""
    if node.bench is not None:
        return BenchRecord.load(node.bench)
    if node.device is not None:
        matches = [r for r in records if r.device == node.device and r.role == node.role]
    else:
        prof = load_profile(node.profile).name
        matches = [r for r in records if r.profile == prof and r.role == node.role]
    if matches:
        return max(matches, key=lambda r: r.created_at)
    raise PlanError(f"node {node.name}: no benchmark record (give bench = FILE, device = ID, "
                    f"or a --bench record of profile {node.profile} and role {node.role})")


def build_problem(net: NetworkConfig, records: Sequence[BenchRecord], model_id: str | None,
                  ov: Overrides | None = None) -> tuple[Problem, list[BenchRecord]]:
    ov = ov or Overrides()
    recs = [record_for(n, records) for n in net.nodes]
    _check_same_model(net, recs, model_id)
    N = recs[0].num_blocks
    names = [n.name for n in net.nodes]
    cons = net.constraints
    budget = cons.accuracy_budget if ov.accuracy_budget is None else ov.accuracy_budget
    wanted = ov.codecs or (tuple(cons.codecs) if cons.codecs else None)
    codec_names = sorted({c.codec for r in recs for c in r.codecs}
                         if wanted is None else {str(parse_spec(c)) for c in wanted})
    if not codec_names:
        codec_names = ["raw"]
    nodes = _node_costs(net, recs, N)
    link_cap = np.array([lk.max_bytes_per_inference or INF for lk in net.links], float)
    _apply_overrides(ov, names, N, nodes, link_cap)
    bytes_, loss, enc, dec = _codec_costs(net, recs, codec_names, N, budget)
    send_s = np.array([(r.spool_append_s or 0.0) * n.time_scale
                       for n, r in zip(net.nodes, recs, strict=True)])
    p = Problem(node_names=names, codec_names=codec_names, comp=nodes.comp, mem=nodes.mem,
                allowed=nodes.allowed, mem_cap=nodes.mem_cap, time_cap=nodes.time_cap,
                power=nodes.power, bytes_=bytes_, enc=np.nan_to_num(enc, nan=INF),
                dec=np.nan_to_num(dec, nan=INF), loss=loss,
                bw_bps=np.array([lk.bandwidth_mbps * 1e6 for lk in net.links], float),
                rtt_s=np.array([lk.rtt_ms / 1e3 for lk in net.links], float),
                link_cap=link_cap, overhead=float(net.mqtt_overhead_bytes), send_s=send_s,
                node_overhead_s=np.array([n.overhead_s for n in net.nodes], float),
                min_device_blocks=(cons.min_device_blocks if ov.min_device_blocks is None
                                   else ov.min_device_blocks))
    if p.min_device_blocks > N:
        raise PlanError(f"min_device_blocks {p.min_device_blocks} > {N} blocks")
    return p, recs


def _check_same_model(net: NetworkConfig, recs: list[BenchRecord], model_id: str | None
                      ) -> None:
    """Every node's record is of the same model (``model_id`` if given)."""
    ref = recs[0]
    for n, r in zip(net.nodes, recs, strict=True):
        if model_id is not None and r.model_id != model_id:
            raise PlanError(f"node {n.name}: record is for model {r.model_id!r}, "
                            f"not {model_id!r}")
        if (r.num_blocks, r.boundaries) != (ref.num_blocks, ref.boundaries):
            raise PlanError(f"node {n.name}: record's blocks/boundaries differ from node "
                            f"{net.nodes[0].name}'s: not the same model")


@dataclass
class _NodeCosts:
    """Per node t and block j: seconds, MB and whether allowed; per node: caps and watts."""

    comp: np.ndarray
    mem: np.ndarray
    allowed: np.ndarray
    mem_cap: np.ndarray
    time_cap: np.ndarray
    power: np.ndarray


def _node_costs(net: NetworkConfig, recs: list[BenchRecord], N: int) -> _NodeCosts:
    T = len(net.nodes)
    c = _NodeCosts(comp=np.full((T, N), INF), mem=np.zeros((T, N)),
                   allowed=np.ones((T, N), bool), mem_cap=np.full(T, INF),
                   time_cap=np.full(T, INF), power=np.full(T, np.nan))
    for t, (n, r) in enumerate(zip(net.nodes, recs, strict=True)):
        prof = load_profile(n.profile)
        for b in r.blocks:
            c.comp[t, b.index - 1] = b.median_s * n.time_scale
            c.mem[t, b.index - 1] = 2 * b.file_bytes / 2**20
        c.mem_cap[t] = n.memory_mb if n.memory_mb is not None else prof.model_memory_mb
        if n.max_time_s is not None:
            c.time_cap[t] = n.max_time_s
        active = n.power_active_w if n.power_active_w is not None else prof.power_active_w
        idle = n.power_idle_w if n.power_idle_w is not None else prof.power_idle_w
        if active is not None:
            c.power[t] = max(0.0, active - (idle or 0.0))
        for j in n.forbid:
            _check_block(j, N, f"node {n.name}: forbid")
            c.allowed[t, j - 1] = False
        for j in n.pin:
            _check_block(j, N, f"node {n.name}: pin")
            c.allowed[:, j - 1] = False
            c.allowed[t, j - 1] = True
    return c


def _apply_overrides(ov: Overrides, names: list[str], N: int, c: _NodeCosts,
                     link_cap: np.ndarray) -> None:
    """The command line's pins, forbids, node time and upload caps, in place."""
    T = len(names)
    for j, name in ov.pins:
        t = _node_index(names, name, "--pin")
        _check_block(j, N, "--pin")
        c.allowed[:, j - 1] = False
        c.allowed[t, j - 1] = True
    for j, name in ov.forbids:
        _check_block(j, N, "--forbid")
        c.allowed[_node_index(names, name, "--forbid"), j - 1] = False
    for name, seconds in ov.max_node_time:
        c.time_cap[_node_index(names, name, "--max-node-time")] = seconds
    for name, nbytes in ov.max_upload_bytes:
        if name == "*":
            link_cap[:] = np.minimum(link_cap, nbytes)
        else:
            t = _node_index(names, name, "--max-upload-bytes")
            if t >= T - 1:
                raise PlanError(f"--max-upload-bytes: node {name} has no link after it")
            link_cap[t] = min(link_cap[t], nbytes)


def _codec_costs(net: NetworkConfig, recs: list[BenchRecord], codec_names: list[str], N: int,
                 budget: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bytes_, loss, enc, dec) of every codec at every boundary (module docstring)."""
    T, S = len(net.nodes), len(codec_names)
    bytes_ = np.full((N + 1, S), INF)
    loss = np.zeros((N + 1, S))
    enc = np.full((T, N + 1, S), INF)
    dec = np.full((T, N + 1, S), INF)
    allow_unmeasured = net.constraints.allow_unmeasured_lossy
    for s, spec in enumerate(codec_names):
        for b in range(N + 1):
            found = [(t, m) for t, r in enumerate(recs) if (m := r.codec_at(b, spec))]
            if not found:
                continue
            m0 = found[0][1]
            measured_loss = next((m.accuracy_loss for _t, m in found
                                  if m.accuracy_loss is not None), None)
            if measured_loss is None and not m0.lossless and not allow_unmeasured:
                continue
            if measured_loss is not None and measured_loss > budget:
                continue
            bytes_[b, s] = m0.bytes
            loss[b, s] = measured_loss or 0.0
            own = dict(found)
            for t, n in enumerate(net.nodes):
                m = own.get(t)
                src_scale = 1.0 if m else net.nodes[found[0][0]].time_scale
                m = m or m0
                scale = n.time_scale / src_scale
                enc[t, b, s] = m.encode_s * scale
                dec[t, b, s] = m.decode_s * scale
    return bytes_, loss, enc, dec


def _check_block(j: int, n: int, what: str) -> None:
    if not 1 <= j <= n:
        raise PlanError(f"{what}: block {j} outside 1..{n}")


def _node_index(names: list[str], name: str, what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise PlanError(f"{what}: no node {name!r} (nodes: {', '.join(names)})") from None
