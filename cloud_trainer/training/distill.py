"""Block-wise knowledge transfer (KnowledgeNet): every student block learns its teacher block.

Student block ``i`` is trained on pairs ``(a_{i-1}, teacher_block_i(a_{i-1}))``: no labels,
and no gradient crosses a block boundary (inputs are detached, every block has its own
optimiser), so blocks train independently — no backprop locking, each could run on its own
worker. Inner blocks regress the teacher block's output with MSE; the last block matches the
teacher's logits with Hinton's temperature-scaled KL (plus cross-entropy where labels exist),
which keeps the chain's predictions consistent. When a student agrees with its teacher at
every boundary their blocks are interchangeable, which split inference relies on.

Why MSE and not smooth-L1: the targets are a deterministic function of the inputs (no label
noise, no outliers to be robust against), and the error that propagates downstream is the L2
distance at the boundary; smooth-L1 would under-weight exactly the large errors on strongly
activated units that matter most to the next block. Adam makes the loss scale irrelevant.

Where ``a_{i-1}`` comes from (``train_student_blockwise_from_inputs``, measured by
``knet bench distill`` on ``digits``, label-free, 200 transfer images, 600 steps, seed 0):
- ``"teacher"`` (classic KT, teacher forcing): 98.3 % test accuracy. Each block fits the
  teacher on the teacher's inputs and gets the student's at inference; this works only when
  every student block *can* reproduce its teacher block — with the earlier one-conv digits
  student it reached 55 % (docs/models.md).
- ``"student"`` (the student's own a_{i-1}, target teacher_block_i(a_{i-1}); exactly what
  device uplinks allow): 99.1 %. With the earlier student it reached 10 % from scratch (the
  teacher's response to a wrong input is itself wrong); it is meant for *re*training a
  deployed student whose boundaries already agree (``train_blockwise`` on uplinks).
- ``"student+boundary"`` (student's own a_{i-1}, target the teacher's a_i for the same raw
  input): 98.9 %. Each block learns to correct its upstream's error; needs raw inputs.

Options beyond KnowledgeNet's independent blocks: labels may mark unlabelled inputs with
``UNLABELED`` (label-scarce training), and ``finetune_epochs`` ends the run with an
end-to-end KD stage (``hint_weight`` adds variance-normalised boundary MSE) inside the same
epoch budget. Both are measured in docs/benchmarks.md; the fine-tune stage did not beat the
block-wise one there, so it is off by default.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.training.train import minibatches, random_shift, total_steps, training_context

log = logging.getLogger(__name__)
Array = np.ndarray | torch.Tensor
Progress = Callable[[str, int, int, float], None]
InputSource = Literal["teacher", "student", "student+boundary"]
INPUT_SOURCES = ("teacher", "student", "student+boundary")
_CHUNK = 512  # inference batch for targets and evaluation
UNLABELED = -1  # label value of an input without a label
ShouldStop = Callable[[], bool]


class TrainingInterrupted(KnetTrainerError, RuntimeError):
    """The caller asked training to stop (a trainer shutting down); nothing was returned.

    Checked between optimiser steps, so a SIGTERM stops even a long run within a step; the
    trainer's run log then resumes the run at its next start.
    """


def _check_stop(stop: ShouldStop | None) -> None:
    if stop is not None and stop():
        raise TrainingInterrupted("training stopped on request")


@dataclass
class BlockwiseResult:
    """What a block-wise run did. ``student`` is a new model; the one passed in is untouched.

    ``loss_before``/``loss_after`` are each trained block's loss on its own training inputs,
    in eval mode, so the two are comparable (the training loss mixes batch-norm modes).
    """

    student: BlockModel
    trained: list[int] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)  # block -> why it was not trained
    loss_before: dict[int, float] = field(default_factory=dict)
    loss_after: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def losses(self) -> dict[int, float]:
        return self.loss_after

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (without the model)."""
        return {"trained": list(self.trained),
                "frozen": {str(k): v for k, v in sorted(self.frozen.items())},
                "loss_before": {str(k): v for k, v in sorted(self.loss_before.items())},
                "loss_after": {str(k): v for k, v in sorted(self.loss_after.items())},
                "seconds": self.seconds}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Hinton's distillation loss, scaled by T² so its gradients keep their size."""
    t = temperature
    return nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=1),
        nn.functional.softmax(teacher_logits / t, dim=1), reduction="batchmean") * t * t


def logits_loss(out: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                *, temperature: float, alpha: float) -> torch.Tensor:
    """``alpha``·KD + (1-``alpha``)·CE with labels; KD alone without them.

    A label of ``UNLABELED`` (-1) marks an input without a label (label-scarce training):
    CE averages over the labelled rows of the batch and is 0 when there are none, so the
    KD term keeps the same weight in every batch.
    """
    kd = kd_loss(out, teacher_logits, temperature)
    if labels is None:
        return kd
    known = labels != UNLABELED
    if bool(known.all()):
        ce = nn.functional.cross_entropy(out, labels)
    elif bool(known.any()):
        ce = nn.functional.cross_entropy(out[known], labels[known])
    else:
        ce = out.sum() * 0.0
    return alpha * kd + (1 - alpha) * ce


def normalized_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the target's variance: 1.0 means "no better than predicting the mean",
    so boundaries of different scale weigh alike when their losses are summed."""
    return nn.functional.mse_loss(out, target) / (target.var() + 1e-8)


def _tensor(a: Array) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().float()
    return torch.from_numpy(np.array(a, dtype=np.float32))


@torch.no_grad()
def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([module(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)])


def _freeze_bn(module: nn.Module) -> None:
    """Every batch norm in ``module`` back to eval mode (running statistics, not batch)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class BlockFit:
    """One student block, its own Adam + one-cycle schedule, and its local loss.

    Nothing here sees another block: inputs arrive detached, so the gradient stops at the
    block's input and blocks can be stepped in any order, or on different workers.
    """

    def __init__(self, block: nn.Module, *, last: bool, lr: float, steps: int,
                 temperature: float, alpha: float, frozen: bool = False,
                 bn_frozen: bool = False) -> None:
        self.block, self.last = block, last
        self.temperature, self.alpha = temperature, alpha
        self.frozen, self.bn_frozen = frozen, bn_frozen
        self.opt = torch.optim.Adam(block.parameters(), lr=lr)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=lr, total_steps=max(1, steps))

    def _train_mode(self) -> None:
        """Train mode, except batch norms when ``bn_frozen``: they keep their running
        statistics (a pretrained-derived block fine-tuned on small, correlated batches —
        frames of a few scenes — would otherwise learn from batch statistics it never sees
        at inference)."""
        self.block.train()
        if self.bn_frozen:
            _freeze_bn(self.block)

    def loss(self, out: torch.Tensor, target: torch.Tensor,
             labels: torch.Tensor | None) -> torch.Tensor:
        if self.last:
            return logits_loss(out, target, labels, temperature=self.temperature,
                               alpha=self.alpha)
        return nn.functional.mse_loss(out, target)

    def step(self, x: torch.Tensor, target: torch.Tensor,
             labels: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """One optimiser step; returns the loss and the block's (detached) output. A
        ``frozen`` block only runs (eval mode), so the blocks after it see its output."""
        if self.frozen:
            self.block.eval()
            with torch.no_grad():
                out = self.block(x)
                return float(self.loss(out, target, labels)), out
        self._train_mode()
        out = self.block(x.detach())
        loss = self.loss(out, target, labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.sched.last_epoch < self.sched.total_steps:
            self.sched.step()
        return float(loss.detach()), out.detach()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, target: torch.Tensor,
                 labels: torch.Tensor | None = None) -> float:
        self.block.eval()
        return float(self.loss(_apply(self.block, x), target, labels))


def _frozen_reason(i: int) -> str:
    if i == 1:
        return "no raw inputs (boundary 0) were uplinked"
    return f"no activations at boundary {i - 1}"


def _fit_block(fit: BlockFit, x: torch.Tensor, target: torch.Tensor,
               labels: torch.Tensor | None, *, epochs: int, batch_size: int,
               gen: torch.Generator, stop: ShouldStop | None = None) -> float:
    """Train one block on its fixed (input, target) set; returns the final epoch's mean."""
    mean = 0.0
    for _ in range(epochs):
        total = 0.0
        for idx in minibatches(len(x), batch_size, gen):
            _check_stop(stop)
            loss, _ = fit.step(x[idx], target[idx], None if labels is None else labels[idx])
            total += loss * len(idx)
        mean = total / len(x)
    fit.block.eval()
    return mean


def _check_pair(teacher: BlockModel, student: BlockModel) -> None:
    if teacher.boundary_shapes != student.boundary_shapes:
        raise ValueError(f"teacher and student boundaries differ: {teacher.boundary_shapes} "
                         f"vs {student.boundary_shapes}")


def _selected(student: BlockModel, blocks: Iterable[int] | None) -> list[int]:
    wanted = sorted(set(blocks)) if blocks is not None else list(
        range(1, student.num_blocks + 1))
    for i in wanted:
        student.block(i)  # raises IndexError for a block that does not exist
    return wanted


def train_blockwise(teacher: BlockModel, student: BlockModel,
                    activations: Mapping[int, Array], *, blocks: Iterable[int] | None = None,
                    epochs: int = 20, lr: float = 3e-3, batch_size: int = 64,
                    temperature: float = 4.0, alpha: float = 0.5, seed: int = 0,
                    labels: Array | None = None, workers: int = 1, threads: int | None = 1,
                    progress: Progress | None = None,
                    stop: ShouldStop | None = None, bn_frozen: bool = False) -> BlockwiseResult:
    """Train the student blocks whose input boundary is present in ``activations``.

    ``activations[b]`` holds inputs at boundary ``b`` (what devices uplinked). Block ``i``
    trains on ``activations[i-1]`` against ``teacher.block(i)`` applied to the same inputs.
    Block 1 needs raw inputs (boundary 0); without them it stays frozen and the result says
    why. ``labels`` (optional) align with ``activations[N-1]`` and add CE to the last block.
    ``stop`` is polled between steps (:class:`TrainingInterrupted`).
    Each block draws from its own generator (seeded by ``seed`` and its index), so a block's
    result does not depend on which other blocks train, nor on ``workers`` (threads; torch
    releases the GIL in its kernels).
    """
    _check_pair(teacher, student)
    t0 = time.perf_counter()
    teacher.eval()
    result = BlockwiseResult(student=copy.deepcopy(student).eval())
    wanted = _selected(student, blocks)
    todo = []
    for i in range(1, student.num_blocks + 1):
        if i not in wanted:
            result.frozen[i] = "not selected"
        elif i - 1 not in activations or len(activations[i - 1]) == 0:
            result.frozen[i] = _frozen_reason(i)
        else:
            todo.append(i)
    y = None if labels is None else torch.tensor(np.asarray(labels), dtype=torch.int64)

    def one(i: int) -> tuple[int, float, float]:
        x = _tensor(activations[i - 1])
        last = i == student.num_blocks
        target = _apply(teacher.block(i), x)
        block_labels = y if last and y is not None and len(y) == len(x) else None
        if last and y is not None and block_labels is None:
            raise ValueError(f"{len(y)} labels for {len(x)} inputs of the last block")
        fit = BlockFit(result.student.block(i), last=last, lr=lr,
                       steps=total_steps(len(x), epochs, batch_size),
                       temperature=temperature, alpha=alpha, bn_frozen=bn_frozen)
        before = fit.evaluate(x, target, block_labels)
        gen = torch.Generator().manual_seed(seed * 1009 + i)
        _fit_block(fit, x, target, block_labels, epochs=epochs, batch_size=batch_size, gen=gen,
                   stop=stop)
        return i, before, fit.evaluate(x, target, block_labels)

    with training_context(seed, threads):
        if workers > 1 and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                done = list(pool.map(one, todo))
        else:
            done = [one(i) for i in todo]
    for n, (i, before, after) in enumerate(done, start=1):
        result.trained.append(i)
        result.loss_before[i], result.loss_after[i] = before, after
        if progress:
            progress(f"block {i}", n, len(todo), after)
    result.student.eval()
    result.seconds = round(time.perf_counter() - t0, 3)
    log.info("block-wise KT: trained %s, frozen %s, loss %s -> %s", result.trained,
             result.frozen, result.loss_before, result.loss_after)
    return result


@torch.no_grad()
def boundary_activations(model: BlockModel, x: Array) -> dict[int, torch.Tensor]:
    """``model``'s activations at boundaries 0..N-1 for raw inputs ``x`` (eval mode)."""
    model.eval()
    xt = _tensor(x)
    chunks = [model.boundaries(xt[i : i + _CHUNK]) for i in range(0, len(xt), _CHUNK)]
    return {b: torch.cat([c[b] for c in chunks]) for b in range(model.num_blocks)}


def train_student_blockwise_from_inputs(
        teacher: BlockModel, student: BlockModel, x_unlabeled: Array, *,
        inputs: InputSource = "student", labels: Array | None = None, epochs: int = 30,
        lr: float = 3e-3, batch_size: int = 64, temperature: float = 4.0, alpha: float = 0.5,
        shift: int = 0, seed: int = 0, threads: int | None = 1,
        progress: Progress | None = None, finetune_epochs: int = 0,
        hint_weight: float = 0.0, finetune_lr: float | None = None,
        stop: ShouldStop | None = None, freeze: Iterable[int] = (),
        bn_frozen: bool = False) -> BlockwiseResult:
    """Block-wise KT from raw inputs, every block trained, activations computed per batch.

    ``inputs="teacher"`` feeds block ``i`` the teacher's ``a_{i-1}`` (classic KT, teacher
    forcing); ``"student"`` feeds it the student's own ``a_{i-1}`` — the previous block's
    output in the same step, detached — with target ``teacher_block_i(a_{i-1})``, exactly
    what training on device uplinks does; ``"student+boundary"`` feeds the student's own
    ``a_{i-1}`` with the teacher's ``a_i`` as target (best from scratch, module doc). In every
    mode no gradient crosses a boundary; each
    block has its own optimiser taking ``epochs`` × ⌈n/batch⌉ steps (the same budget as
    training the whole student once). ``shift`` augments the raw inputs per batch.
    ``labels`` may hold ``UNLABELED`` for inputs without one. ``finetune_epochs`` (of the
    ``epochs``) run end to end after the block-wise stage — KD (+ CE) at the logits plus
    ``hint_weight`` × the normalised MSE at inner boundaries, one Adam for the whole chain
    at ``finetune_lr`` (default ``lr``) — so the total step count stays the same.
    ``stop`` is polled between steps (:class:`TrainingInterrupted`). Blocks in ``freeze``
    only run (e.g. blocks copied whole from the teacher); ``bn_frozen`` keeps every batch
    norm on its running statistics (``BlockFit``).
    """
    _check_pair(teacher, student)
    if inputs not in INPUT_SOURCES:
        raise ValueError(f"inputs must be one of {INPUT_SOURCES}, not {inputs!r}")
    t0 = time.perf_counter()
    teacher.eval()
    result = BlockwiseResult(student=copy.deepcopy(student).eval())
    s = result.student
    xt = _tensor(x_unlabeled)
    y = None if labels is None else torch.tensor(np.asarray(labels), dtype=torch.int64)
    if not 0 <= finetune_epochs <= epochs:
        raise ValueError(f"finetune_epochs must be within 0..epochs, not {finetune_epochs}")
    blockwise_epochs = epochs - finetune_epochs
    steps = total_steps(len(xt), blockwise_epochs, batch_size)
    frozen = set(freeze)
    fits = [BlockFit(s.block(i), last=i == s.num_blocks, lr=lr, steps=steps,
                     temperature=temperature, alpha=alpha, frozen=i in frozen,
                     bn_frozen=bn_frozen) for i in range(1, s.num_blocks + 1)]
    with training_context(seed, threads):
        result.loss_before = _chain_losses(teacher, s, fits, xt, y, inputs)
        gen = torch.Generator().manual_seed(seed)
        cached = _teacher_targets(teacher, xt) if shift == 0 and inputs != "student" \
            and blockwise_epochs > 1 else None
        for epoch in range(blockwise_epochs):
            total = 0.0
            for idx in minibatches(len(xt), batch_size, gen):
                _check_stop(stop)
                xb = random_shift(xt[idx], shift, gen)
                t_acts = None if cached is None else [a[idx] for a in cached]
                losses = _chain_step(teacher, fits, xb, None if y is None else y[idx], inputs,
                                     t_acts)
                total += sum(losses) * len(idx)
            if progress:
                progress(f"block-wise KT ({inputs} inputs)", epoch + 1, epochs,
                         total / len(xt))
        if finetune_epochs:
            _finetune(teacher, s, xt, y, gen, epochs=finetune_epochs,
                      lr=lr if finetune_lr is None else finetune_lr, batch_size=batch_size,
                      temperature=temperature, alpha=alpha, shift=shift,
                      hint_weight=hint_weight, progress=progress, first_epoch=blockwise_epochs,
                      total_epochs=epochs)
        s.eval()
        result.loss_after = _chain_losses(teacher, s, fits, xt, y, inputs)
    result.trained = [i for i in range(1, s.num_blocks + 1) if i not in frozen]
    result.frozen = dict.fromkeys(sorted(frozen), "frozen by the caller")
    result.seconds = round(time.perf_counter() - t0, 3)
    log.info("block-wise KT from inputs (%s): loss %s -> %s", inputs, result.loss_before,
             result.loss_after)
    return result


def _finetune(teacher: BlockModel, student: BlockModel, xt: torch.Tensor,
              y: torch.Tensor | None, gen: torch.Generator, *, epochs: int, lr: float,
              batch_size: int, temperature: float, alpha: float, shift: int,
              hint_weight: float, progress: Progress | None, first_epoch: int,
              total_epochs: int) -> None:
    """End-to-end stage after the block-wise one: KD (+ CE) at the logits, plus
    ``hint_weight`` × the variance-normalised MSE at every inner boundary."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, total_steps(len(xt), epochs, batch_size)))
    n = student.num_blocks
    student.train()
    for epoch in range(epochs):
        total = 0.0
        for idx in minibatches(len(xt), batch_size, gen):
            xb = random_shift(xt[idx], shift, gen)
            with torch.no_grad():
                t_acts = teacher.boundaries(xb)
            s_acts = student.boundaries(xb)
            loss = logits_loss(s_acts[n], t_acts[n], None if y is None else y[idx],
                               temperature=temperature, alpha=alpha)
            if hint_weight:
                loss = loss + hint_weight * sum(
                    normalized_mse(s_acts[b], t_acts[b]) for b in range(1, n))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if progress:
            progress("end-to-end fine-tune", first_epoch + epoch + 1, total_epochs,
                     total / len(xt))
    student.eval()


TEACHER_CACHE_BYTES = 1 << 30  # teacher targets kept for all epochs up to this size


@torch.no_grad()
def _teacher_targets(teacher: BlockModel, xt: torch.Tensor) -> list[torch.Tensor] | None:
    """The teacher's activations at every boundary for every input, computed once.

    Without input augmentation they are the same in every epoch; on a pretrained
    EfficientNet-Lite teacher they are ~45 % of a ``student+boundary`` step. ``None`` when
    they would take more than ``TEACHER_CACHE_BYTES`` (then they are computed per batch).
    """
    per_input = sum(4 * int(np.prod(s)) for s in teacher.boundary_shapes)
    if per_input * len(xt) > TEACHER_CACHE_BYTES:
        return None
    teacher.eval()
    chunks = [teacher.boundaries(xt[i : i + _CHUNK]) for i in range(0, len(xt), _CHUNK)]
    return [torch.cat([c[b] for c in chunks]) for b in range(teacher.num_blocks + 1)]


def _chain_step(teacher: BlockModel, fits: list[BlockFit], xb: torch.Tensor,
                yb: torch.Tensor | None, inputs: InputSource,
                t_acts: list[torch.Tensor] | None = None) -> list[float]:
    """One step of every block on one batch; each block's input is detached. ``t_acts``:
    the teacher's boundaries for ``xb`` when the caller has them already."""
    if t_acts is None:
        with torch.no_grad():
            t_acts = teacher.boundaries(xb) if inputs != "student" else []
    a = xb
    losses = []
    for i, fit in enumerate(fits, start=1):
        if inputs == "teacher":
            a_in, target = t_acts[i - 1], t_acts[i]
        elif inputs == "student+boundary":
            a_in, target = a, t_acts[i]
        else:
            a_in = a
            with torch.no_grad():
                target = teacher.block(i)(a_in)
        loss, a = fit.step(a_in, target, yb if fit.last else None)
        losses.append(loss)
    return losses


LOSS_SAMPLES = 1024  # the before/after losses are reported on at most this many inputs


@torch.no_grad()
def _chain_losses(teacher: BlockModel, student: BlockModel, fits: list[BlockFit],
                  x: torch.Tensor, y: torch.Tensor | None,
                  inputs: InputSource) -> dict[int, float]:
    """Every block's local loss in eval mode, with the inputs the mode trains on, on the
    first ``LOSS_SAMPLES`` inputs: a report, not a training signal, and on thousands of
    EfficientNet frames three full passes cost more than the training steps themselves."""
    x = x[:LOSS_SAMPLES]
    y = None if y is None else y[:LOSS_SAMPLES]
    acts = boundary_activations(teacher if inputs == "teacher" else student, x)
    t_acts = boundary_activations(teacher, x)
    t_acts[teacher.num_blocks] = _apply(teacher, x)
    out = {}
    for i, fit in enumerate(fits, start=1):
        target = (_apply(teacher.block(i), acts[i - 1]) if inputs == "student"
                  else t_acts[i])
        out[i] = fit.evaluate(acts[i - 1], target, y if fit.last else None)
    return out


def train_logit_kd(teacher: BlockModel, student: BlockModel, x: Array, labels: Array | None,
                   *, epochs: int = 30, lr: float = 3e-3, batch_size: int = 64,
                   temperature: float = 4.0, alpha: float = 0.5, shift: int = 0,
                   seed: int = 0, threads: int | None = 1,
                   bn_frozen: bool = False) -> BlockModel:
    """Classic (Hinton) distillation: supervision at the final logits only, end to end.

    The baseline block-wise KT is compared against; returns a new, trained student.
    ``bn_frozen`` as in :class:`BlockFit`.
    """
    _check_pair(teacher, student)
    teacher.eval()
    model = copy.deepcopy(student)
    xt = _tensor(x)
    y = None if labels is None else torch.tensor(np.asarray(labels), dtype=torch.int64)
    with training_context(seed, threads):
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=max(1, total_steps(len(xt), epochs, batch_size)))
        model.train()
        if bn_frozen:
            _freeze_bn(model)
        for _ in range(epochs):
            for idx in minibatches(len(xt), batch_size, gen):
                xb = random_shift(xt[idx], shift, gen)
                with torch.no_grad():
                    t_logits = teacher(xb)
                loss = logits_loss(model(xb), t_logits, None if y is None else y[idx],
                                   temperature=temperature, alpha=alpha)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def boundary_mse(teacher: BlockModel, student: BlockModel, x: Array) -> dict[int, float]:
    """MSE between the chains' own activations at every boundary 1..N (how interchangeable
    their blocks are: small everywhere means split inference can switch at any cut)."""
    t, s = boundary_activations(teacher, x), boundary_activations(student, x)
    xt = _tensor(x)
    t_last, s_last = teacher(xt), student(xt)
    out = {b: float(nn.functional.mse_loss(s[b], t[b])) for b in range(1, teacher.num_blocks)}
    out[teacher.num_blocks] = float(nn.functional.mse_loss(s_last, t_last))
    return out
