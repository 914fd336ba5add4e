"""`knet bench distill`: KnowledgeNet's knowledge-transfer table on the ``digits`` zoo.

Rows: the teacher (trained on labels); the student trained alone on labels; classic logit
distillation (Hinton KD + CE); block-wise KT (block losses + KD + CE); block-wise KT from
unlabeled inputs only. Rows 2-5 start from the same initial student and get the same budget:
``epochs`` passes over the same training images (same batch size, so the same number of
optimiser steps per parameter), Adam + one-cycle at the same LR, the same ±1 px shifts.
A second table compares where block ``i``'s input comes from (teacher forcing vs the
student's own activations), label-free, on the first seed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.report import command_line, console, print_table, write_json

if TYPE_CHECKING:
    from cloud_trainer.blocks import BlockModel
    from cloud_trainer.data import Split

MODEL = "digits"
LR, BATCH, SHIFT, TEMPERATURE, ALPHA = 3e-3, 64, 1, 4.0, 0.5
ROWS = ("teacher", "student alone (labels)", "logit KD (KD + CE)",
        "block-wise KT (blocks + KD + CE)", "block-wise KT, unlabeled")
BKT_INPUTS = "student+boundary"  # the best of the measured input sources, see modes table
MODES = ("teacher", "student", "student+boundary")


def _student_runs(epochs: int) -> dict[str, Callable[..., Any]]:
    """Rows 2-5: (teacher, initial student, data split, seed) -> trained student."""
    from cloud_trainer.distill import train_logit_kd, train_student_blockwise_from_inputs
    from cloud_trainer.train import train_supervised

    common = {"epochs": epochs, "lr": LR, "batch_size": BATCH, "shift": SHIFT}
    kd = {**common, "temperature": TEMPERATURE, "alpha": ALPHA}

    def alone(teacher: BlockModel, init: BlockModel, split: Split, seed: int) -> BlockModel:
        return train_supervised(copy.deepcopy(init), split.x_train, split.y_train,
                                seed=seed, **common)

    def logit_kd(teacher: BlockModel, init: BlockModel, split: Split,
                 seed: int) -> BlockModel:
        return train_logit_kd(teacher, init, split.x_train, split.y_train, seed=seed, **kd)

    def bkt(teacher: BlockModel, init: BlockModel, split: Split, seed: int,
            labels: bool = True) -> BlockModel:
        y = split.y_train if labels else None
        return train_student_blockwise_from_inputs(
            teacher, init, split.x_train, labels=y, inputs=BKT_INPUTS, seed=seed, **kd).student

    return {ROWS[1]: alone, ROWS[2]: logit_kd, ROWS[3]: bkt,
            ROWS[4]: lambda t, i, s, seed: bkt(t, i, s, seed, labels=False)}


def _seed_scores(seed: int, epochs: int) -> dict[str, tuple[float, float]]:
    """Test accuracy (%) and training seconds of every row for one model seed."""
    from cloud_trainer.data import digits_splits
    from cloud_trainer.train import evaluate, trained_pair
    from cloud_trainer.zoo import get_pair

    split = digits_splits()
    pair = trained_pair(MODEL, seed)
    init = get_pair(MODEL, seed).student
    scores = {ROWS[0]: (100 * evaluate(pair.teacher, split.x_test, split.y_test),
                        float(pair.metrics.get("teacher_train_s", float("nan"))))}
    for name, run in _student_runs(epochs).items():
        t0 = time.perf_counter()
        model = run(pair.teacher, init, split, seed)
        scores[name] = (100 * evaluate(model, split.x_test, split.y_test),
                        time.perf_counter() - t0)
    return scores


def _mode_rows(seed: int, epochs: int) -> list[dict[str, Any]]:
    """Label-free block-wise KT with each source of block inputs: accuracy and how close
    the student's own activations get to the teacher's at every boundary."""
    from cloud_trainer.data import digits_splits
    from cloud_trainer.distill import boundary_mse, train_student_blockwise_from_inputs
    from cloud_trainer.train import evaluate, trained_pair
    from cloud_trainer.zoo import get_pair

    split = digits_splits()
    teacher = trained_pair(MODEL, seed).teacher
    init = get_pair(MODEL, seed).student
    rows = []
    for mode in MODES:
        r = train_student_blockwise_from_inputs(
            teacher, init, split.x_train, inputs=mode, epochs=epochs, lr=LR,
            batch_size=BATCH, shift=SHIFT, temperature=TEMPERATURE, seed=seed)
        mse = boundary_mse(teacher, r.student, split.x_test)
        rows.append({"inputs": mode, "accuracy": 100 * evaluate(r.student, split.x_test,
                                                                 split.y_test),
                     "boundary_mse": {str(k): v for k, v in mse.items()},
                     "seconds": r.seconds})
    return rows


def _summarise(per_seed: list[dict[str, tuple[float, float]]]) -> list[dict[str, Any]]:
    teacher = np.array([s[ROWS[0]][0] for s in per_seed])
    out = []
    for name in ROWS:
        acc = np.array([s[name][0] for s in per_seed])
        secs = np.array([s[name][1] for s in per_seed])
        out.append({"row": name, "accuracy_mean": float(acc.mean()),
                    "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    "delta_vs_teacher": float((acc - teacher).mean()),
                    "accuracy_per_seed": [float(a) for a in acc],
                    "train_s_mean": float(np.nanmean(secs)) if np.isfinite(secs).any()
                    else float("nan")})
    return out


def _goals(rows: list[dict[str, Any]], reduction: float) -> dict[str, Any]:
    by = {r["row"]: r for r in rows}
    bkt, kd = by[ROWS[3]], by[ROWS[2]]
    return {"student_at_least_62pct_smaller": reduction >= 0.62,
            "bkt_within_half_point_of_teacher": bkt["delta_vs_teacher"] >= -0.5,
            "bkt_better_than_logit_kd": bkt["accuracy_mean"] > kd["accuracy_mean"]}


def run_distill_bench(seeds: Sequence[int] = (0, 1, 2), epochs: int = 30,
                      json_path: Path | str | None = None, plot_path: Path | str | None = None,
                      modes: bool = True) -> dict[str, Any]:
    from cloud_trainer.zoo import get_pair

    t0 = time.perf_counter()
    pair = get_pair(MODEL, 0)
    t_params, s_params = pair.teacher.params(), pair.student.params()
    per_seed = [_seed_scores(seed, epochs) for seed in seeds]
    rows = _summarise(per_seed)
    params = [t_params] + [s_params] * 4
    print_table(
        f"{MODEL}: knowledge transfer, {len(seeds)} seeds, {epochs} epochs each for rows 2-5 "
        f"(teacher {t_params:,} params, student {s_params:,}: "
        f"{100 * pair.size_reduction:.1f} % smaller)",
        ["row", "params", "test accuracy %", "± std", "Δ vs teacher", "per seed", "train s"],
        [(r["row"], f"{p:,}", r["accuracy_mean"], r["accuracy_std"], r["delta_vs_teacher"],
          " ".join(f"{a:.2f}" for a in r["accuracy_per_seed"]), r["train_s_mean"])
         for r, p in zip(rows, params, strict=True)])
    mode_rows = _mode_rows(seeds[0], epochs) if modes else []
    if mode_rows:
        print_table(f"block-wise KT without labels: where block i's input comes from "
                    f"(seed {seeds[0]}); MSE of the chains' own activations vs the teacher's",
                    ["inputs", "test accuracy %", *(f"MSE b{b}" for b in
                                                     mode_rows[0]["boundary_mse"]), "s"],
                    [(m["inputs"], m["accuracy"], *m["boundary_mse"].values(), m["seconds"])
                     for m in mode_rows])
    goals = _goals(rows, pair.size_reduction)
    console.print("goals: " + ", ".join(f"{k} {'[green]yes[/]' if v else '[red]no[/]'}"
                                        for k, v in goals.items()))
    result = {"model": MODEL, "seeds": list(seeds), "epochs": epochs,
              "settings": {"lr": LR, "batch_size": BATCH, "shift": SHIFT,
                           "temperature": TEMPERATURE, "alpha": ALPHA,
                           "bkt_inputs": BKT_INPUTS},
              "teacher_params": t_params, "student_params": s_params,
              "size_reduction": pair.size_reduction, "rows": rows, "input_modes": mode_rows,
              "goals": goals, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(json_path, "distill", command_line(), result)
    if plot_path:
        plot(rows, Path(plot_path))
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(rows)), [r["accuracy_mean"] for r in rows],
           yerr=[r["accuracy_std"] for r in rows], capsize=4)
    ax.set_xticks(range(len(rows)), [r["row"] for r in rows], rotation=20, ha="right",
                  fontsize=8)
    low = min(r["accuracy_mean"] - r["accuracy_std"] for r in rows)
    ax.set_ylim(max(0.0, low - 2), 100)
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax.set_title("knet knowledge transfer on digits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"[dim]wrote {path}[/dim]")
