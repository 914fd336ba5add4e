"""`knet bench disagg`: training a block model with its blocks on separate worker processes.

KnowledgeNet's second claim, measured on the ``digits`` zoo student trained from all 1,257
labelled training images of scikit-learn's ``load_digits`` (8×8 digits; the MNIST-like
fall-back: no installed package ships MNIST itself, and nothing is downloaded), scored on
the 540-image test split. Three modes of one trainer (``cloud_trainer/training/disagg``), the same
number of optimiser steps per block, the same batches, Adam + one-cycle at the same LR:

* end-to-end backprop in one process (the reference);
* pipelined backprop on 2 ``torchrun`` workers (GPipe, 4 micro-batches, true gradients);
* synthetic gradients (DNI) on 2 workers: the M block on the cut predicts the gradient,
  conditioned on the label; on the split that balances the workers' costs (the one the
  throughput rows use) and on the split after block 2, where the M block sits on the conv
  features (there with a wider, deeper M block that replays recent gradients, ``M2``; and
  also with the plain M block, without the label, and without the trust scaling of
  ``TrainSpec.trust``, knet's addition to DNI);
* controls: backprop with the blocks below each split frozen at their initialisation —
  what those blocks would score if the synthetic gradient taught them nothing at all.

Then throughput with 1, 2 and 4 worker processes (first seed): each multi-worker run
against one process running the same blocks and M blocks in sequence (the same
computation, no links), samples/s over the training loop (launch and rendezvous are
reported apart), bytes sent between ranks per step, and each worker's CPU seconds per step
(its main thread), from which the rate on separate machines is predicted.

M-block quality: the cosine similarity between its prediction and the gradient it then
received (online, every update, in windows of a tenth of the run), and at checkpoints
against the true gradient of the loss computed by backprop through the blocks above.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.report import command_line, console, print_table, write_json

if TYPE_CHECKING:
    from cloud_trainer.models.blocks import BlockModel
    from cloud_trainer.training.disagg import TrainResult, TrainSpec

MODEL = "digits"
STEPS, BATCH, LR, SHIFT = 600, 64, 3e-3, 1
CHECKPOINTS = 10
# the M block on boundary 2 (32×4×4): as wide as the boundary, 3 convs, 3 extra Adam steps
# per arriving gradient on the last 8 (measured: the plain M block trails backprop by 1-2
# points there; docs/benchmarks.md)
M2: dict[str, Any] = {"m_hidden": 32, "m_layers": 3, "m_replay": 8, "m_replay_steps": 3}
ROWS = {"bp": "backprop, 1 process",
        "pp": "pipelined backprop, 2 workers (balanced split)",
        "sg": "synthetic gradients, 2 workers (balanced split)",
        "frozen": "control: blocks below the balanced split frozen",
        "sg2": "synthetic gradients, 2 workers (split after block 2, M2)",
        "sg2_plain": "synthetic gradients, 2 workers (split after block 2, plain M block)",
        "sg2_uncond": "synthetic gradients, 2 workers (split after block 2, M without label)",
        "sg2_notrust": "synthetic gradients, 2 workers (split after block 2, no trust scaling)",
        "frozen2": "control: blocks 1-2 frozen"}


def _spec(mode: str, workers: int, seed: int, steps: int, **kw: Any) -> TrainSpec:
    from cloud_trainer.training.disagg import TrainSpec

    every = max(1, steps // CHECKPOINTS)
    return TrainSpec(mode=mode, workers=workers, steps=steps, batch_size=BATCH, lr=LR,  # type: ignore[arg-type]
                     seed=seed, shift=SHIFT,
                     checkpoints=tuple(range(every, steps + 1, every)), **kw)


def _accuracy_curve(init: BlockModel, r: TrainResult, x: np.ndarray,
                    y: np.ndarray) -> list[tuple[int, float]]:
    from cloud_trainer.training.train import evaluate

    out = []
    for step in sorted(r.checkpoints):
        model = copy.deepcopy(init)
        for i, state in r.checkpoints[step].items():
            model.block(i).load_state_dict(state)
        out.append((step, 100 * evaluate(model, x, y)))
    return out


def _true_cosines(init: BlockModel, r: TrainResult, x: np.ndarray,
                  y: np.ndarray) -> dict[str, list[tuple[int, float]]]:
    """Per boundary with an M block, at each checkpoint: cosine between its prediction and
    the true ∂L/∂h (backprop through the blocks above, eval mode, 256 test images)."""
    import torch

    from cloud_trainer.training.disagg.synthetic import SyntheticGradient

    xt = torch.from_numpy(np.array(x[:256], np.float32))
    yt = torch.from_numpy(np.array(y[:256], np.int64))
    out: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(r.m_checkpoints):
        model = copy.deepcopy(init).eval()
        for i, state in r.checkpoints[step].items():
            model.block(i).load_state_dict(state)
        for b, state in r.m_checkpoints[step].items():
            m = SyntheticGradient(model.boundary_shapes[b], model.num_classes,
                                  r.spec.conditioned, r.spec.m_hidden, r.spec.m_layers)
            m.load_state_dict(state)
            with torch.no_grad():
                h = model.run(xt, 1, b)
            h.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model.run(h, b + 1), yt)
            (grad,) = torch.autograd.grad(loss, h)
            with torch.no_grad():
                pred = m(h.detach(), yt)
                cos = torch.nn.functional.cosine_similarity(pred.flatten(1), grad.flatten(1),
                                                            dim=1).mean()
            out.setdefault(str(b), []).append((step, float(cos)))
    return out


def _windows(values: list[float], n: int = CHECKPOINTS) -> list[float]:
    if not values:
        return []
    size = max(1, len(values) // n)
    return [float(np.mean(values[k : k + size])) for k in range(0, size * n, size)
            if values[k : k + size]]


def _record(init: BlockModel, r: TrainResult, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    curve = _accuracy_curve(init, r, x, y)
    cpu = [s["cpu_s"] / r.spec.steps for s in r.stats]
    return {"accuracy": curve[-1][1], "curve": curve, "workers": r.spec.workers,
            "partition": list(r.spec.partition or (1,)), "ranges": [list(x) for x in r.ranges],
            "boundaries": list(r.spec.boundaries or ()), "loop_s": r.loop_s,
            "wall_s": r.wall_s, "samples_per_s": r.samples_per_s,
            "bytes_per_step": r.bytes_per_step, "cpu_ms_per_step": [1000 * c for c in cpu],
            "bytes_sent_per_step": [s["bytes_sent"] / r.spec.steps for s in r.stats],
            "final_loss": float(np.mean(r.losses[-20:])),
            "online_cosine": {str(b): _windows(c) for b, c in r.cosines.items()},
            "true_cosine": _true_cosines(init, r, x, y) if r.m_checkpoints else {},
            "backward_waits": [s["backward_waits"] for s in r.stats],
            "backward_wait_s": [s["backward_wait_s"] for s in r.stats],
            "forward_wait_s": [s["forward_wait_s"] for s in r.stats],
            "pending_at_forward_mean": [float(np.mean(s["pending_at_forward"]))
                                        if s["pending_at_forward"] else 0.0 for s in r.stats],
            "gradient_lag_mean": [float(np.mean(s["gradient_lag"])) if s["gradient_lag"]
                                  else 0.0 for s in r.stats]}


def _predicted(rec: dict[str, Any], link_bytes_per_s: float) -> dict[str, float]:
    """Samples/s with one machine per worker: a batch per step of the slowest worker, its
    step being its compute (CPU seconds of its training thread) with the transfers hidden
    behind it (receives are posted ahead, sends are asynchronous), or with its sends added
    at ``link_bytes_per_s`` (nothing overlapped: a floor)."""
    cpu = [c / 1000 for c in rec["cpu_ms_per_step"]]
    sent = rec["bytes_sent_per_step"]
    return {"overlapped": BATCH / max(cpu),
            "serialised": BATCH / max(c + b / link_bytes_per_s
                                      for c, b in zip(cpu, sent, strict=True))}


class _Runner:
    """Trains one spec from the zoo student's initialisation on the training split and
    records it against the test split."""

    def __init__(self, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> None:
        self.x, self.y, self.xt, self.yt = x, y, xt, yt

    def __call__(self, key: str, seed: int, spec: TrainSpec) -> dict[str, Any]:
        from cloud_trainer.models.zoo import get_pair
        from cloud_trainer.training.disagg import train_disaggregated

        init = get_pair(MODEL, seed).student
        console.print(f"[dim]{key} seed {seed}: {spec.mode}, {spec.workers} worker(s)[/dim]")
        r = train_disaggregated(init, self.x, self.y, spec)
        return _record(init, r, self.xt, self.yt)


def _seed_specs(seed: int, steps: int, two: TrainSpec) -> dict[str, TrainSpec]:
    """One spec per row of ``ROWS`` for ``seed`` (``two``: the resolved 2-worker split)."""
    cut = tuple(two.boundaries or ())
    after2 = (1, 3)  # blocks 1-2 | 3-4: the M block sits on the conv features
    return {
        "bp": _spec("backprop", 1, seed, steps),
        "pp": _spec("pipelined", 2, seed, steps, partition=two.partition),
        "sg": _spec("synthetic-gradients", 2, seed, steps, partition=two.partition),
        "frozen": _spec("backprop", 1, seed, steps, frozen=tuple(range(1, cut[0] + 1))),
        "sg2": _spec("synthetic-gradients", 2, seed, steps, partition=after2, **M2),
        "sg2_plain": _spec("synthetic-gradients", 2, seed, steps, partition=after2),
        "sg2_uncond": _spec("synthetic-gradients", 2, seed, steps, partition=after2,
                            conditioned=False, **M2),
        "sg2_notrust": _spec("synthetic-gradients", 2, seed, steps, partition=after2,
                             trust=False, **M2),
        "frozen2": _spec("backprop", 1, seed, steps, frozen=(1, 2))}


def _accuracy_rows(per_seed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: accuracy over seeds, against backprop, and the M blocks' cosines."""
    bp = np.array([r["accuracy"] for r in per_seed["bp"]])
    rows = []
    for key, name in ROWS.items():
        acc = np.array([r["accuracy"] for r in per_seed[key]])
        last = [r["online_cosine"] for r in per_seed[key]]
        true = [r["true_cosine"] for r in per_seed[key]]
        rows.append({"key": key, "row": name, "accuracy_mean": float(acc.mean()),
                     "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "delta_vs_backprop": float((acc - bp).mean()),
                     "accuracy_per_seed": [float(a) for a in acc],
                     "m_cosine_online_last": float(np.mean([c[b][-1] for c in last for b in c]))
                     if any(last) else float("nan"),
                     "m_cosine_true_final": float(np.mean([c[b][-1][1] for c in true for b in c]))
                     if any(true) else float("nan"),
                     "loop_s_mean": float(np.mean([r["loop_s"] for r in per_seed[key]]))})
    return rows


def _print_accuracy(rows: list[dict[str, Any]], seeds: Sequence[int], steps: int,
                    two: TrainSpec) -> None:
    print_table(
        f"{MODEL}: training from all labels with blocks on worker processes, {len(seeds)} seeds, "
        f"{steps} optimiser steps of batch {BATCH} per block; balanced split: workers at "
        f"blocks {list(two.partition or ())}, M block on boundary {list(two.boundaries or ())}",
        ["mode", "test accuracy %", "± std", "Δ vs backprop", "per seed", "M cos (online)",
         "M cos (true grad)", "loop s"],
        [(r["row"], r["accuracy_mean"], r["accuracy_std"], r["delta_vs_backprop"],
          " ".join(f"{a:.2f}" for a in r["accuracy_per_seed"]), r["m_cosine_online_last"],
          r["m_cosine_true_final"], r["loop_s_mean"]) for r in rows])


def _scale_row(mode: str, rec: dict[str, Any], base: dict[str, Any] | None,
               what: str) -> dict[str, Any]:
    return {**rec, "mode": mode, "what": what,
            "speedup": rec["samples_per_s"] / base["samples_per_s"] if base else 1.0,
            "predicted": _predicted(rec, 125e6)}


def _scaling(run: _Runner, seed: int, steps: int, workers: Sequence[int],
             per_seed: dict[str, list[dict[str, Any]]], two: TrainSpec,
             four: TrainSpec) -> list[dict[str, Any]]:
    """Throughput rows for ``seed``: 1 / 2 / 4 workers, each against the same blocks and M
    blocks run in sequence by one process."""
    cut = tuple(two.boundaries or ())
    sg1_two = run("sg1", seed, _spec("synthetic-gradients", 1, seed, steps, boundaries=cut))
    pp1 = run("pp1", seed, _spec("pipelined", 1, seed, steps))
    scaling = [
        _scale_row("backprop", per_seed["bp"][0], None, "reference"),
        _scale_row("pipelined", pp1, None, "same micro-batches, one process"),
        _scale_row("pipelined", per_seed["pp"][0], pp1, ""),
        _scale_row("synthetic-gradients", sg1_two, None, "2-worker blocks in sequence"),
        _scale_row("synthetic-gradients", per_seed["sg"][0], sg1_two, "")]
    sg1_after2 = run("sg1x2", seed, _spec("synthetic-gradients", 1, seed, steps,
                                          boundaries=(2,), **M2))
    scaling += [
        _scale_row("synthetic-gradients", sg1_after2, None, "blocks 1-2 | 3-4 in sequence"),
        _scale_row("synthetic-gradients", per_seed["sg2"][0], sg1_after2, "split after 2")]
    if 4 in workers:
        every = tuple(four.boundaries or ())
        sg1_four = run("sg1x4", seed, _spec("synthetic-gradients", 1, seed, steps,
                                            boundaries=every))
        pp4 = run("pp4", seed, _spec("pipelined", 4, seed, steps, partition=four.partition))
        sg4 = run("sg4", seed, _spec("synthetic-gradients", 4, seed, steps,
                                     partition=four.partition))
        scaling += [
            _scale_row("pipelined", pp4, pp1, ""),
            _scale_row("synthetic-gradients", sg1_four, None, "4-worker blocks in sequence"),
            _scale_row("synthetic-gradients", sg4, sg1_four, "")]
    return scaling


def _print_scaling(scaling: list[dict[str, Any]], seed: int, load_before: Sequence[float],
                   per_seed: dict[str, list[dict[str, Any]]]) -> None:
    print_table(
        f"throughput, seed {seed}, {os.cpu_count()} cores (load average {load_before[0]:.1f} "
        "at the start); speed-up against the same blocks in one process; predicted = batch / "
        "slowest worker's CPU per step, one machine per worker",
        ["mode", "workers", "blocks", "M on", "accuracy %", "loop s", "samples/s",
         "speed-up", "bytes/step", "CPU ms/step (per worker)", "predicted samples/s",
         "bwd waits"],
        [(r["mode"] + (f" ({r['what']})" if r["what"] else ""), r["workers"],
          " ".join(f"{a}-{b}" for a, b in r["ranges"]), ",".join(map(str, r["boundaries"]))
          or "-", r["accuracy"], r["loop_s"], r["samples_per_s"], r["speedup"],
          f"{r['bytes_per_step']:,.0f}", " ".join(f"{c:.1f}" for c in r["cpu_ms_per_step"]),
          r["predicted"]["overlapped"], sum(r["backward_waits"])) for r in scaling])
    print_table(f"M block on the cut (seed {seed}): cosine with the gradient that came back, "
                "in tenths of the run (online), and with the true gradient at checkpoints",
                ["run", "boundary", "online, by tenth", "true gradient, by checkpoint"],
                [(key, b, " ".join(f"{c:.2f}" for c in per_seed[key][0]["online_cosine"][b]),
                  " ".join(f"{c:.2f}" for _, c in per_seed[key][0]["true_cosine"].get(b, [])))
                 for key in ("sg", "sg2", "sg2_plain", "sg2_uncond", "sg2_notrust")
                 for b in per_seed[key][0]["online_cosine"]])


def _goals(rows: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> dict[str, bool]:
    by = {r["key"]: r for r in rows}
    two_w = next(r for r in scaling if r["mode"] == "synthetic-gradients" and r["workers"] == 2)
    goals = {"sg_within_0.7_points_of_backprop": by["sg"]["delta_vs_backprop"] >= -0.7,
             "sg_split_after_2_within_0.7_points": by["sg2"]["delta_vs_backprop"] >= -0.7,
             "sg_2_workers_at_least_1.6x_one_worker": two_w["speedup"] >= 1.6}
    console.print("goals: " + ", ".join(f"{k} {'[green]yes[/]' if v else '[red]no[/]'}"
                                        for k, v in goals.items()))
    return goals


def run_disagg_bench(seeds: Sequence[int] = (0, 1, 2), steps: int = STEPS,
                     workers: Sequence[int] = (1, 2, 4), json_path: Path | str | None = None,
                     plot_path: Path | str | None = None) -> dict[str, Any]:
    from cloud_trainer.models.data import digits_splits
    from cloud_trainer.models.zoo import get_pair
    from cloud_trainer.training.disagg.launch import resolve

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    s = digits_splits()
    run = _Runner(s.x_train, s.y_train, s.x_test, s.y_test)

    # one split for every seed: the cost-balanced one for 2 workers (and its cut)
    two, _ = resolve(get_pair(MODEL, 0).student, _spec("synthetic-gradients", 2, 0, steps))
    four, _ = resolve(get_pair(MODEL, 0).student, _spec("synthetic-gradients", 4, 0, steps))
    per_seed: dict[str, list[dict[str, Any]]] = {k: [] for k in ROWS}
    for seed in seeds:
        for key, spec in _seed_specs(seed, steps, two).items():
            per_seed[key].append(run(key, seed, spec))
    rows = _accuracy_rows(per_seed)
    _print_accuracy(rows, seeds, steps, two)

    # throughput: the first seed, 1 / 2 / 4 workers, each against its own 1-worker sequence
    scaling = _scaling(run, seeds[0], steps, workers, per_seed, two, four)
    _print_scaling(scaling, seeds[0], load_before, per_seed)
    goals = _goals(rows, scaling)
    result = {"model": MODEL, "data": "scikit-learn load_digits (8x8), 1,257 train / 540 test",
              "seeds": list(seeds), "steps": steps,
              "settings": {"batch_size": BATCH, "lr": LR, "shift": SHIFT,
                           "optimizer": "adam + one-cycle",
                           "m_lr": two.m_lr, "microbatches": two.microbatches,
                           "partition_2": list(two.partition or ()),
                           "partition_4": list(four.partition or ()),
                           "m_boundaries_2": list(two.boundaries or ()),
                           "m_block_split_after_2": M2},
              "rows": rows, "per_seed": per_seed, "scaling": scaling, "goals": goals,
              "load_average": {"start": load_before, "end": os.getloadavg()},
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(json_path, "disagg", command_line(), result)
    if plot_path:
        plot(per_seed, Path(plot_path))
    return result


def plot(per_seed: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("bp", "-"), ("pp", "--"), ("sg", "-"), ("frozen", "-."),
                       ("sg2", "-"), ("sg2_plain", "--"), ("sg2_uncond", ":"), ("sg2_notrust", ":"),
                       ("frozen2", "-.")):
        runs = per_seed[key]
        steps = [s for s, _ in runs[0]["curve"]]
        acc = np.array([[a for _, a in r["curve"]] for r in runs])
        mean, std = acc.mean(0), acc.std(0)
        ax.plot(steps, mean, style, label=ROWS[key])
        ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
        if key in ("sg", "sg2"):
            for b in runs[0]["true_cosine"]:
                cos = np.array([[c for _, c in r["true_cosine"][b]] for r in runs])
                cx.plot([s for s, _ in runs[0]["true_cosine"][b]], cos.mean(0),
                        label=f"M on boundary {b} vs true gradient")
                online = np.array([r["online_cosine"][b] for r in runs])
                cx.plot(np.linspace(steps[-1] / len(online[0]), steps[-1], len(online[0])),
                        online.mean(0), "--", label=f"boundary {b}, online (target received)")
    ax.set_xlabel("optimiser steps per block")
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    late = [a for key in per_seed for r in per_seed[key]
            for _, a in r["curve"][len(r["curve"]) // 2:]]
    ax.set_ylim(max(0.0, min(late) - 3), 100)  # the second half, where the modes differ
    ax.legend(fontsize=7)
    ax.set_title("digits: accuracy vs steps")
    cx.set_xlabel("optimiser steps")
    cx.set_ylabel("cosine similarity")
    cx.set_ylim(-0.1, 1)
    cx.legend(fontsize=7)
    cx.set_title("synthetic gradient quality")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"[dim]wrote {path}[/dim]")
