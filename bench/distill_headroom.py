"""`knet bench distill --model effnet-lite0 --headroom BLOCK`: how much top-1 agreement one
student block can reach at all, and what more parameters would buy.

The block is trained *alone* on the teacher's own input to it (teacher forcing, so no error
from the blocks below), against the teacher's boundary (MSE) plus the teacher's logits
reached through the teacher's blocks above it (KL): the most this block could give the
chain. Two versions of the block, both initialised from the teacher: the zoo student's, and
the teacher's non-residual MBConvs at full width (the repeats left out, nothing narrowed).
Agreement is the teacher's top-1 with that one block swapped in, on training frames and on
fresh in-scene frames, every fifth of the run: how far training alone goes, and how much of
the gap is generalisation.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import command_line, console, print_table, write_json

BATCH, LR, EVAL_TRAIN = 64, 3e-3, 960


def _variants(block: int) -> dict[str, Any]:
    from torch import nn

    from cloud_trainer.models.zoo import effnet
    from cloud_trainer.models.zoo.efficientnet_lite import MBConv

    pair = effnet.build_pair("derived")
    full = nn.Sequential(*(copy.deepcopy(m) for m in pair.teacher.block(block).modules()
                           if isinstance(m, MBConv) and not m.skip))
    return {"teacher": pair.teacher, "zoo student's block": pair.student.block(block),
            "teacher's non-residual MBConvs, full width": full}


def run_headroom(block: int = 4, steps: int = 1500, seed: int = 0,
                 json_path: Path | str | None = None) -> dict[str, Any]:
    import torch
    from torch.nn import functional as F

    from cloud_trainer.models.zoo.effnet import BLOCK_ENDS
    from cloud_trainer.training.train import scene_set

    if not 1 <= block <= len(BLOCK_ENDS):
        raise ValueError(f"--headroom takes a block made of MBConvs, 1-{len(BLOCK_ENDS)}, "
                         f"not {block}")
    variants = _variants(block)
    teacher = variants.pop("teacher")
    x, _ = scene_set("train", seed)
    xe, ye = scene_set("in-scene", 0)

    @torch.no_grad()
    def acts(frames: np.ndarray) -> list[torch.Tensor]:
        chunks = [teacher.boundaries(torch.from_numpy(np.array(frames[i : i + 256],
                                                               np.float32)))
                  for i in range(0, len(frames), 256)]
        return [torch.cat(c) for c in zip(*chunks, strict=True)]

    torch.set_num_threads(1)
    t_train, t_held = acts(np.asarray(x)), acts(np.asarray(xe))

    def through(h: torch.Tensor) -> torch.Tensor:
        """The teacher's blocks above ``block`` (an inner block: there is one at least)."""
        return teacher.run(h, block + 1)

    @torch.no_grad()
    def swap(mod: torch.nn.Module, a: list[torch.Tensor], top1: torch.Tensor) -> float:
        return 100 * float((through(mod(a[block - 1])).argmax(1) == top1).float().mean())

    held_top1, train_top1 = torch.from_numpy(np.array(ye)), t_train[-1].argmax(1)
    sub = [a[:EVAL_TRAIN] for a in t_train]
    results: dict[str, Any] = {}
    for name, mod in variants.items():
        mod.eval()  # batch norms keep the teacher's statistics, as the zoo recipe does
        for p in mod.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(mod.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)
        curve = [(0, swap(mod, sub, train_top1[:EVAL_TRAIN]), swap(mod, t_held, held_top1))]
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            out = mod(t_train[block - 1][idx])
            loss = F.mse_loss(out, t_train[block][idx]) + F.kl_div(
                through(out).log_softmax(1), t_train[-1][idx].softmax(1), reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % max(1, steps // 5) == 0 or step == steps:
                curve.append((step, swap(mod, sub, train_top1[:EVAL_TRAIN]),
                              swap(mod, t_held, held_top1)))
                console.print(f"[dim]{name}: step {step}: train {curve[-1][1]:.1f} %, "
                              f"in-scene {curve[-1][2]:.1f} %[/dim]")
        results[name] = {"params": sum(p.numel() for p in mod.parameters()),
                         "train_s": round(time.perf_counter() - t0, 1),
                         "curve": [{"step": s, "train": a, "in-scene": b} for s, a, b in curve]}
    t_params = sum(p.numel() for p in teacher.block(block).parameters())
    print_table(
        f"effnet-lite0 block {block} alone, teacher-forced, {steps} steps of {BATCH} "
        f"(teacher's block: {t_params:,} params, 100 % by definition): the teacher's top-1 "
        "agreement with this block swapped in",
        ["block version", "params", "train frames %", "in-scene %", "train s"],
        [(n, f"{r['params']:,}", r["curve"][-1]["train"], r["curve"][-1]["in-scene"],
          r["train_s"]) for n, r in results.items()])
    result = {"block": block, "steps": steps, "batch": BATCH, "lr": LR, "seed": seed,
              "teacher_block_params": t_params, "variants": results}
    write_json(json_path, "distill-headroom", command_line(), result)
    return result
