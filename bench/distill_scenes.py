"""`knet bench distill --model effnet-lite0`: knowledge transfer from a pretrained teacher on
real photos, with no labels at all.

The teacher is EfficientNet-Lite0 with its ImageNet weights; the only supervision is what
it says of each frame. Students are scored by *agreement*: the share of held-out frames on
which the student's top-1 is the teacher's top-1, and the share on which the teacher's top-1
is among the student's top 5 — on fresh frames of the training photos (in-scene) and on
photos never trained on (out-of-scene; ``cloud_trainer.models.scenes``).

Rows, each at the same budget (``steps`` optimiser steps of batch ``BATCH`` over the same
training frames, Adam + one-cycle at the same LR): logit KD only (Hinton, end to end);
block-wise KT (KnowledgeNet: every block fitted to its teacher block, ``student+boundary``
inputs, the last block on the logits); block-wise KT then an end-to-end logit term (the last
third of the steps). Students start *derived* from the teacher (the zoo's default) and, for
comparison, from scratch. Seeds draw the training frames and the batch order (and the
scratch initialisation).
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
    import torch

    from cloud_trainer.models.blocks import BlockModel

MODEL = "effnet-lite0"
LR, BATCH, TEMPERATURE, ALPHA = 3e-3, 32, 1.0, 0.5
SURE = 0.5  # "the teacher is sure": its top-1 softmax probability at least this
STEPS = 760  # 20 epochs of the 1,200 training frames: the zoo student's budget
ROWS = ("teacher", "derived student, untrained", "logit KD", "block-wise KT",
        "block-wise KT + logit term", "logit KD (scratch)", "block-wise KT (scratch)")
Trainer = Callable[["BlockModel", "BlockModel", np.ndarray, np.ndarray, int, int],
                   "BlockModel"]


def _trainers() -> dict[str, tuple[str, Trainer]]:
    """Row -> (initial student, trainer(teacher, init, x, teacher_top1, epochs, seed)).

    Every row gets the same supervision at the logits — KD at T = 1 plus cross-entropy on
    the teacher's own top-1, no human label — and keeps batch-norm statistics frozen
    (``cloud_trainer.training.distill.BlockFit``); block-wise rows from the derived student only run
    blocks 1-2, which are the teacher's own."""
    from cloud_trainer.training.distill import train_logit_kd, train_student_blockwise_from_inputs

    def kd(t: BlockModel, s: BlockModel, x: np.ndarray, y: np.ndarray, epochs: int,
           seed: int) -> BlockModel:
        return train_logit_kd(t, s, x, y, epochs=epochs, lr=LR, batch_size=BATCH,
                              temperature=TEMPERATURE, alpha=ALPHA, seed=seed, threads=None,
                              bn_frozen=True)

    def bkt(t: BlockModel, s: BlockModel, x: np.ndarray, y: np.ndarray, epochs: int,
            seed: int, finetune: int = 0, freeze: tuple[int, ...] = (1, 2)) -> BlockModel:
        return train_student_blockwise_from_inputs(
            t, s, x, labels=y, alpha=ALPHA, inputs="student+boundary", epochs=epochs, lr=LR,
            batch_size=BATCH, temperature=TEMPERATURE, seed=seed, threads=None,
            finetune_epochs=finetune, hint_weight=1.0 if finetune else 0.0, freeze=freeze,
            bn_frozen=True).student

    def bkt_scratch(t: BlockModel, s: BlockModel, x: np.ndarray, y: np.ndarray, epochs: int,
                    seed: int) -> BlockModel:
        return bkt(t, s, x, y, epochs, seed, freeze=())

    def bkt_logit(t: BlockModel, s: BlockModel, x: np.ndarray, y: np.ndarray, epochs: int,
                  seed: int) -> BlockModel:
        return bkt(t, s, x, y, epochs, seed, finetune=max(1, epochs // 3))

    return {ROWS[2]: ("derived", kd), ROWS[3]: ("derived", bkt),
            ROWS[4]: ("derived", bkt_logit), ROWS[5]: ("scratch", kd),
            ROWS[6]: ("scratch", bkt_scratch)}


def agreement(model: BlockModel, x: np.ndarray, teacher_top1: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, teacher's top-1 within the student's top 5), in %."""
    import torch

    model.eval()
    top5 = []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            out = model(torch.from_numpy(np.array(x[i : i + 256], np.float32)))
            top5.append(out.topk(5, dim=1).indices.numpy())
    t5 = np.concatenate(top5)
    return (100 * float((t5[:, 0] == teacher_top1).mean()),
            100 * float((t5 == teacher_top1[:, None]).any(axis=1).mean()))


def teacher_acts(teacher: BlockModel, x: np.ndarray) -> list[torch.Tensor]:
    """The teacher's activations at every boundary (0..N) of held-out frames ``x``, once:
    what :func:`swap_agreement` and the teacher's confidence both read."""
    import torch

    teacher.eval()
    with torch.no_grad():
        return teacher.boundaries(torch.from_numpy(np.array(x, np.float32)))


def swap_agreement(teacher: BlockModel, student: BlockModel, acts: Sequence[torch.Tensor],
                   teacher_top1: np.ndarray) -> list[float]:
    """Top-1 agreement (%) of the teacher with one block ``i`` replaced by the student's, for
    each ``i`` (``acts``: :func:`teacher_acts`): which block loses the agreement. Errors
    compound along the chain, so the whole student cannot agree more than its weakest
    block does here."""
    import torch

    student.eval()
    n, out = teacher.num_blocks, []
    with torch.no_grad():
        for i in range(1, n + 1):
            h = student.block(i)(acts[i - 1])
            logits = h if i == n else teacher.run(h, i + 1)
            out.append(100 * float((logits.argmax(1).numpy() == teacher_top1).mean()))
    return out


def _seed_scores(seed: int, steps: int, rows: Sequence[str]) -> dict[str, dict[str, Any]]:
    from cloud_trainer.models.zoo import effnet
    from cloud_trainer.training.train import scene_set

    derived = effnet.build_pair("derived")
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        scratch = effnet.build_pair("scratch").student
    inits = {"derived": derived.student, "scratch": scratch}
    x, y = scene_set("train", seed)
    held = {split: scene_set(split, 0) for split in ("in-scene", "out-of-scene")}
    acts = teacher_acts(derived.teacher, held["in-scene"][0])
    # the teacher is sure where its top-1 probability is at least SURE: agreement there is
    # about the scene, not about which of several near-tied ImageNet classes wins
    sure = (acts[-1].softmax(1).amax(1) >= SURE).numpy()
    epochs = max(1, round(steps / -(-len(x) // BATCH)))

    def score(model: BlockModel, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {"train_s": seconds}
        for split, (xe, ye) in held.items():
            out[f"{split} top1"], out[f"{split} top5"] = agreement(model, xe, ye)
        xe, ye = held["in-scene"]
        out["in-scene top1 sure"] = agreement(model, xe[sure], ye[sure])[0] if sure.any() \
            else float("nan")
        out["in-scene sure share"] = 100 * float(sure.mean())
        out["in-scene swap"] = swap_agreement(derived.teacher, model, acts, ye)
        return out

    scores = {ROWS[0]: score(derived.teacher, float("nan")),
              ROWS[1]: score(derived.student, 0.0)}
    trainers = _trainers()
    for name in rows:
        init_name, fn = trainers[name]
        t0 = time.perf_counter()
        model = fn(derived.teacher, copy.deepcopy(inits[init_name]), np.asarray(x),
                   np.asarray(y), epochs, seed)
        scores[name] = score(model, time.perf_counter() - t0)
        console.print(f"[dim]seed {seed}: {name}: {scores[name]}[/dim]")
    return scores


METRICS = ("in-scene top1", "in-scene top5", "out-of-scene top1", "out-of-scene top5")


def _summarise(per_seed: list[dict[str, dict[str, Any]]],
               names: Sequence[str]) -> list[dict[str, Any]]:
    """Mean ± std over the seeds that ran each row (scratch rows may run on fewer)."""
    out = []
    for name in names:
        row: dict[str, Any] = {"row": name,
                               "seeds": sum(1 for s in per_seed if name in s)}
        for m in (*METRICS, "in-scene top1 sure", "in-scene sure share", "train_s"):
            v = np.array([s[name][m] for s in per_seed if name in s], dtype=np.float64)
            row[m] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            row[f"{m} std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            row[f"{m} per seed"] = [float(a) for a in v]
        swaps = np.array([s[name]["in-scene swap"] for s in per_seed if name in s])
        row["in-scene swap"] = [float(a) for a in swaps.mean(axis=0)]
        out.append(row)
    return out


def _paired(per_seed: list[dict[str, dict[str, Any]]], a: str, b: str,
            metric: str = "in-scene top1") -> dict[str, Any]:
    d = np.array([s[a][metric] - s[b][metric] for s in per_seed])
    return {"metric": metric, "mean": float(d.mean()),
            "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()),
            "per_seed": [float(v) for v in d]}


def run_scene_distill_bench(seeds: Sequence[int] = (0, 1, 2), steps: int = STEPS,
                            json_path: Path | str | None = None,
                            plot_path: Path | str | None = None,
                            rows: Sequence[str] = ROWS[2:],
                            scratch_seeds: int = 1) -> dict[str, Any]:
    """The table above; the from-scratch rows run on the first ``scratch_seeds`` seeds only
    (each row is minutes of CPU; they answer "derived or scratch?", not the goal)."""
    from cloud_trainer.models.scenes import IN_SCENE
    from cloud_trainer.models.zoo import effnet
    from cloud_trainer.training.train import scene_set

    t0 = time.perf_counter()
    pair = effnet.build_pair()
    t_params, s_params = pair.teacher.params(), pair.student.params()
    n = len(scene_set("train", seeds[0])[0])
    epochs = max(1, round(steps / -(-n // BATCH)))
    per_seed = [_seed_scores(seed, steps, [r for r in rows if "scratch" not in r or
                                           k < scratch_seeds])
                for k, seed in enumerate(seeds)]
    names = [ROWS[0], ROWS[1], *rows]
    table = _summarise(per_seed, names)
    print_table(
        f"{MODEL}: label-free knowledge transfer, {len(seeds)} seeds, {n} training frames of "
        f"{len(IN_SCENE)} scenes at 96 px, "
        f"{epochs} epochs × {-(-n // BATCH)} steps of {BATCH} "
        f"(teacher {t_params:,} params, student {s_params:,}: "
        f"{100 * pair.size_reduction:.1f} % smaller)",
        ["row", "seeds", "params", *(f"{m} %" for m in METRICS), "± in-scene top1",
         f"in-scene top1 %, teacher ≥ {SURE}", "train s"],
        [(r["row"], r["seeds"], f"{t_params if r['row'] == ROWS[0] else s_params:,}",
          *(r[m] for m in METRICS), r["in-scene top1 std"], r["in-scene top1 sure"],
          r["train_s"]) for r in table])
    console.print(f"the teacher is sure (top-1 probability ≥ {SURE}) on "
                  f"{table[0]['in-scene sure share']:.1f} % of the in-scene frames")
    blocks = len(table[0]["in-scene swap"])
    print_table(
        "the teacher with one block replaced by the student's: in-scene top-1 agreement %, "
        "mean over seeds (the whole student agrees no better than its weakest block here)",
        ["row", *(f"block {i}" for i in range(1, blocks + 1)), "whole student"],
        [(r["row"], *r["in-scene swap"], r["in-scene top1"]) for r in table[1:]])
    paired = {}
    for a in rows:
        if a != ROWS[2] and "scratch" not in a:
            paired[a] = _paired(per_seed, a, ROWS[2])
            d = paired[a]
            console.print(f"{a} − logit KD, in-scene top-1 agreement per seed: "
                          f"{d['mean']:+.2f} ± {d['std']:.2f} points ({d['wins']} wins, "
                          f"{d['losses']} losses)")
    by = {r["row"]: r for r in table}
    goals = {"student_at_least_62pct_smaller": pair.size_reduction >= 0.62}
    if ROWS[3] in by and ROWS[2] in by:
        goals["bkt_in_scene_at_least_95"] = by[ROWS[3]]["in-scene top1"] >= 95.0
        goals["bkt_ahead_of_logit_kd"] = by[ROWS[3]]["in-scene top1"] > \
            by[ROWS[2]]["in-scene top1"]
    console.print("goals: " + ", ".join(f"{k} {'[green]yes[/]' if v else '[red]no[/]'}"
                                        for k, v in goals.items()))
    result = {"model": MODEL, "seeds": list(seeds), "train_frames": n, "epochs": epochs,
              "steps": epochs * -(-n // BATCH),
              "settings": {"lr": LR, "batch_size": BATCH, "temperature": TEMPERATURE,
                           "bkt_inputs": "student+boundary"},
              "teacher_params": t_params, "student_params": s_params,
              "size_reduction": pair.size_reduction, "rows": table, "paired_vs_logit_kd": paired,
              "goals": goals, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(json_path, "distill-effnet", command_line(), result)
    if plot_path:
        plot(table, Path(plot_path))
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    xs = np.arange(len(rows))
    for k, m in enumerate(METRICS):
        ax.bar(xs + (k - 1.5) * width, [r[m] for r in rows], width,
               yerr=[r[f"{m} std"] for r in rows], capsize=2, label=m)
    ax.set_xticks(xs, [r["row"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("agreement with the teacher, % (mean ± std)")
    ax.set_title(f"knet: label-free knowledge transfer on {MODEL} (real photos)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"[dim]wrote {path}[/dim]")
