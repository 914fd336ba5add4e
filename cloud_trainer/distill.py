"""Block-wise knowledge transfer (KnowledgeNet): every student block learns its teacher block.

Student block ``i`` is trained on pairs ``(a_{i-1}, teacher_block_i(a_{i-1}))``: no labels,
and no gradient crosses a block boundary, so blocks train independently (no backprop
locking; each could run on its own worker). Inner blocks regress the teacher's boundary
activation (MSE); the last block matches the teacher's logits with Hinton's
temperature-scaled KL, which keeps the chain's predictions consistent. When a student agrees
with its teacher at every boundary their blocks are interchangeable, which is what split
inference (student 1..k on the device, teacher k+1..N in the cloud) relies on.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cloud_trainer.blocks import BlockModel

log = logging.getLogger(__name__)
Array = np.ndarray | torch.Tensor
Progress = Callable[[str, int, int, float], None]


@dataclass
class BlockwiseResult:
    student: BlockModel  # a new model; the one passed in is never modified
    trained: list[int] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)  # block -> why it was not trained
    losses: dict[int, float] = field(default_factory=dict)  # final epoch's mean loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Hinton's distillation loss, scaled by T² so its gradients keep their size."""
    t = temperature
    return nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=1),
        nn.functional.softmax(teacher_logits / t, dim=1), reduction="batchmean") * t * t


def _tensor(a: Array) -> torch.Tensor:
    return a.detach().float() if isinstance(a, torch.Tensor) else torch.from_numpy(
        np.array(a, dtype=np.float32))


def train_block(student_block: nn.Module, teacher_block: nn.Module, x: torch.Tensor, *,
                last: bool, epochs: int, lr: float, batch_size: int, temperature: float,
                gen: torch.Generator) -> float:
    """Fit one student block to its teacher block on inputs ``x``; returns the final loss."""
    teacher_block.eval()
    with torch.no_grad():
        target = torch.cat([teacher_block(x[i : i + 512]) for i in range(0, len(x), 512)])
    opt = torch.optim.Adam(student_block.parameters(), lr=lr)
    steps = max(1, epochs * ((len(x) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    student_block.train()
    mean = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            out = student_block(x[idx])
            loss = (kd_loss(out, target[idx], temperature) if last
                    else nn.functional.mse_loss(out, target[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        mean = total / len(x)
    student_block.eval()
    return mean


def train_blockwise(teacher: BlockModel, student: BlockModel,
                    activations: Mapping[int, Array], *, blocks: Iterable[int] | None = None,
                    epochs: int = 20, lr: float = 2e-3, batch_size: int = 64,
                    temperature: float = 4.0, seed: int = 0,
                    progress: Progress | None = None) -> BlockwiseResult:
    """Train the student blocks whose input boundary is present in ``activations``.

    ``activations[b]`` holds inputs at boundary ``b`` (what devices uplinked). Block 1 needs
    the raw inputs (boundary 0); without them it stays frozen and the result says so.
    """
    if teacher.boundary_shapes != student.boundary_shapes:
        raise ValueError("teacher and student boundaries differ")
    wanted = list(blocks) if blocks is not None else list(range(1, student.num_blocks + 1))
    result = BlockwiseResult(student=copy.deepcopy(student).eval())
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for i in wanted:
        if (i - 1) not in activations or len(activations[i - 1]) == 0:
            result.frozen[i] = (
                "no raw inputs (boundary 0) were uplinked" if i == 1
                else f"no activations at boundary {i - 1}")
            continue
        x = _tensor(activations[i - 1])
        result.losses[i] = train_block(
            result.student.block(i), teacher.block(i), x, last=i == student.num_blocks,
            epochs=epochs, lr=lr, batch_size=batch_size, temperature=temperature, gen=gen)
        result.trained.append(i)
        if progress:
            progress(f"block {i}", len(result.trained), len(wanted), result.losses[i])
    for i in range(1, student.num_blocks + 1):
        if i not in wanted:
            result.frozen.setdefault(i, "not selected")
    log.info("block-wise KT: trained %s, frozen %s", result.trained, result.frozen)
    return result


@torch.no_grad()
def teacher_boundaries(teacher: BlockModel, x: Array) -> dict[int, torch.Tensor]:
    """The teacher's activations at boundaries 0..N-1 for raw inputs (teacher forcing)."""
    teacher.eval()
    acts = teacher.boundaries(_tensor(x))
    return dict(enumerate(acts[:-1]))


def distill_from_inputs(teacher: BlockModel, student: BlockModel, x: Array,
                        **kwargs: object) -> BlockwiseResult:
    """Classic block-wise KT from unlabeled raw inputs: every block learns on the teacher's
    own boundary activations, so the student converges to the teacher's representation."""
    return train_blockwise(teacher, student, teacher_boundaries(teacher, x), **kwargs)  # type: ignore[arg-type]
