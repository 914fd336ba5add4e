"""The training loops of one worker: its contiguous blocks, their optimisers, their M blocks.

The same code runs on every rank and, with one rank, in the trainer's own process:

* ``backprop`` — one process, one mini-batch, the loss backpropagated end to end (reference).
* ``pipelined`` — GPipe: each mini-batch is cut into micro-batches that flow forward through
  the workers, then their true gradients flow back; every worker steps once per mini-batch,
  so the result is backprop's (up to batch-norm statistics per micro-batch), and every
  worker waits for the backward pass of the ones above it.
* ``synthetic-gradients`` — DNI: after computing a boundary activation ``h_i`` a block
  updates at once with ``M_i(h_i, y)``. The block above returns the gradient it computes for
  its input, itself from its own M block (bootstrapping, as in the paper) or from the loss
  for the last block, and ``M_i`` learns from it whenever it arrives. Inside one worker that
  is immediately; across workers the gradient comes later, by a receiver thread, and the
  loop never waits for it (``RankStats.backward_waits`` stays 0).

No synthetic *inputs*: a worker still waits for its activations. Forward decoupling would
remove only the pipeline's fill (a few batches of thousands), and it adds a second
approximation on the path every block depends on; with a pipeline the forward messages
stream and a balanced worker does not wait on them in the steady state.

All ranks draw the same batches (one generator from the seed), so labels are never sent:
only activations forward and gradients backward cross a link.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_trainer.blocks import BlockModel
from cloud_trainer.disagg.comm import Links
from cloud_trainer.disagg.spec import RankStats, TrainSpec
from cloud_trainer.disagg.synthetic import SyntheticGradient, SyntheticGradientTrainer
from cloud_trainer.train import random_shift

log = logging.getLogger(__name__)
StepHook = Callable[[int, float], None]  # (steps done, training loss of the last step)
State = dict[str, torch.Tensor]


def batches(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) sample indices: successive shuffles of ``0..n-1``, cut into full
    batches (identical on every rank, so a worker knows every batch's labels)."""
    b = min(batch_size, n)
    per = n // b
    gen = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []
    while len(rows) < steps:
        order = torch.randperm(n, generator=gen)
        rows += list(order[: per * b].view(per, b))
    return torch.stack(rows[:steps])


def trainable_below(model: BlockModel, frozen: tuple[int, ...]) -> list[bool]:
    """``out[i]``: some block ``1..i`` trains, so boundary ``i`` needs a gradient (0..N)."""
    out, seen = [False], False
    for i in range(1, model.num_blocks + 1):
        seen = seen or i not in frozen
        out.append(seen)
    return out


def snapshot(module: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class RankResult:
    """A worker's trained blocks and what it measured (plain data: it crosses processes)."""

    rank: int
    blocks: tuple[int, int]
    states: dict[int, State]
    checkpoints: dict[int, dict[int, State]] = field(default_factory=dict)
    m_checkpoints: dict[int, dict[int, State]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    cosines: dict[int, list[float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Blocks ``first..last`` of ``model`` on this worker, with their optimisers and M blocks."""

    def __init__(self, model: BlockModel, first: int, last: int, spec: TrainSpec) -> None:
        self.model, self.first, self.last, self.spec = model, first, last, spec
        self.n = model.num_blocks
        self.below = trainable_below(model, spec.frozen)
        self.opts: dict[int, tuple[torch.optim.Optimizer, Any]] = {}
        for i in range(first, last + 1):
            block = model.block(i)
            if i in spec.frozen:
                block.eval().requires_grad_(False)
                continue
            block.train()
            opt = torch.optim.Adam(block.parameters(), lr=spec.lr) if spec.optimizer == "adam" \
                else torch.optim.SGD(block.parameters(), lr=spec.lr, momentum=0.9, nesterov=True)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr,
                                                        total_steps=spec.steps)
            self.opts[i] = (opt, sched)
        self.sg: dict[int, SyntheticGradientTrainer] = {}
        cuts = set(spec.boundaries or ()) if spec.mode == "synthetic-gradients" else set()
        for i in sorted(cuts):
            if first <= i <= last and i < self.n and self.below[i]:
                m = SyntheticGradient(model.boundary_shapes[i], model.num_classes,
                                      spec.conditioned, spec.m_hidden, spec.m_layers)
                self.sg[i] = SyntheticGradientTrainer(m, spec.m_lr)
        # runs of blocks trained by backprop between two decoupled boundaries
        ends = sorted({i for i in cuts if first <= i < last} | {last})
        starts = [first] + [e + 1 for e in ends[:-1]]
        self.segments = list(zip(starts, ends, strict=True))

    def needs_input_grad(self, i: int) -> bool:
        """Block ``i``'s input needs a gradient: something below it trains."""
        return i >= 2 and self.below[i - 1]

    def zero_grad(self) -> None:
        for opt, _ in self.opts.values():
            opt.zero_grad(set_to_none=True)

    def step(self, i: int, trust: float = 1.0) -> None:
        """One optimiser step of block ``i``, its learning rate scaled by ``trust``."""
        if i in self.opts:
            opt, sched = self.opts[i]
            if self.spec.clip:
                nn.utils.clip_grad_norm_(self.model.block(i).parameters(), self.spec.clip)
            lrs = [g["lr"] for g in opt.param_groups]
            if trust != 1.0:
                for g in opt.param_groups:
                    g["lr"] *= trust
            opt.step()
            for g, lr in zip(opt.param_groups, lrs, strict=True):
                g["lr"] = lr
            sched.step()
            opt.zero_grad(set_to_none=True)

    def blocks_snapshot(self) -> dict[int, State]:
        return {i: snapshot(self.model.block(i)) for i in range(self.first, self.last + 1)}

    def m_snapshot(self) -> dict[int, State]:
        return {i: snapshot(t.module) for i, t in self.sg.items()}


class Data:
    """Batches for this rank: inputs only where the first block runs, labels everywhere."""

    def __init__(self, x: np.ndarray | None, y: np.ndarray, spec: TrainSpec) -> None:
        self.x = None if x is None else torch.from_numpy(np.array(x, np.float32))
        self.y = torch.from_numpy(np.array(y, np.int64))
        self.idx = batches(len(self.y), spec.batch_size, spec.steps, spec.seed)
        self.shift = spec.shift
        self.gen = torch.Generator().manual_seed(spec.seed + 1)
        self.parts = spec.microbatches if spec.mode == "pipelined" else 1

    @property
    def batch_size(self) -> int:
        return int(self.idx.shape[1])

    def labels(self, t: int) -> torch.Tensor:
        return self.y[self.idx[t]]

    def inputs(self, t: int) -> torch.Tensor:
        assert self.x is not None, "only the first worker reads inputs"
        xb = self.x[self.idx[t]]
        return random_shift(xb, self.shift, self.gen) if self.shift else xb

    def micro(self, t: int) -> list[slice]:
        sizes = [len(c) for c in torch.arange(self.batch_size).tensor_split(self.parts)]
        out, start = [], 0
        for s in sizes:
            if s:
                out.append(slice(start, start + s))
            start += s
        return out


def train_rank(model: BlockModel, first: int, last: int, data: Data, spec: TrainSpec,
               links: Links | None, stats: RankStats, on_step: StepHook | None = None,
               stop: Callable[[], bool] | None = None) -> RankResult:
    """Train blocks ``first..last`` of ``model`` (in place) for ``spec.steps`` steps."""
    stage = Stage(model, first, last, spec)
    result = RankResult(stats.rank, (first, last), {})
    loop = _sg_loop if spec.mode == "synthetic-gradients" else _pipelined_loop
    t0, c0 = time.perf_counter(), time.thread_time()
    loop(stage, data, spec, links, stats, result, on_step, stop)
    stats.loop_s = time.perf_counter() - t0
    stats.cpu_s = time.thread_time() - c0
    for i in range(first, last + 1):
        model.block(i).eval()
    result.states = stage.blocks_snapshot()
    result.cosines = {i: t.cosines for i, t in stage.sg.items()}
    result.stats = stats.to_dict()
    return result


def _after_step(t: int, stage: Stage, spec: TrainSpec, stats: RankStats, result: RankResult,
                on_step: StepHook | None, stop: Callable[[], bool] | None) -> None:
    done = t + 1
    if done in spec.checkpoints:
        result.checkpoints[done] = stage.blocks_snapshot()
        result.m_checkpoints[done] = stage.m_snapshot()
    if on_step is not None and stage.last == stage.n:
        on_step(done, result.losses[-1])
    if stop is not None and stop():
        from cloud_trainer.distill import TrainingInterrupted

        raise TrainingInterrupted("training stopped on request")
    delay = spec.delay_s.get(stats.rank, 0.0)
    if delay:
        time.sleep(delay)  # a deliberately slow worker (tests)


def _sg_loop(stage: Stage, data: Data, spec: TrainSpec, links: Links | None, stats: RankStats,
             result: RankResult, on_step: StepHook | None,
             stop: Callable[[], bool] | None) -> None:
    a, b, n = stage.first, stage.last, stage.n
    shapes = stage.model.boundary_shapes
    bsz = data.batch_size
    remote = links is not None and links.next is not None and b in stage.sg
    waiting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (h_b, y)
    if remote:
        assert links is not None
        links.start_gradient_receiver(spec.steps, (bsz, *shapes[b]))
    if links is not None and links.prev is not None:
        links.expect_forward(spec.steps)

    def learn_remote(items: list[tuple[int, torch.Tensor]], now: int) -> None:
        for s, grad in items:
            h_s, y_s = waiting.pop(s)
            stage.sg[b].learn(h_s, y_s, grad)
            stats.gradient_lag.append(now - s)

    for t in range(spec.steps):
        y = data.labels(t)
        if remote:
            stats.pending_at_forward.append(len(waiting))
        if a == 1:
            h = data.inputs(t)
        else:
            assert links is not None
            h = links.recv_forward((bsz, *shapes[a - 1]))
        for s, e in stage.segments:
            inp = h.detach().requires_grad_(stage.needs_input_grad(s))
            out = stage.model.run(inp, s, e)
            trust = 1.0
            if e < n:
                h = out.detach()
                if e == b and links is not None and links.next is not None:
                    links.send_forward(h)
                if e in stage.sg:
                    out.backward(stage.sg[e].synthetic(h, y))
                    trust = stage.sg[e].trust if spec.trust else 1.0
                    if e == b and remote:
                        waiting[t] = (h, y)
            else:
                loss = nn.functional.cross_entropy(out, y)
                loss.backward()
                result.losses.append(float(loss.detach()))
            for i in range(s, e + 1):
                stage.step(i, trust)
            if inp.requires_grad:
                assert inp.grad is not None
                if s > a:  # the boundary below is on this worker: its M learns now
                    stage.sg[s - 1].learn(inp.detach(), y, inp.grad)
                else:
                    assert links is not None
                    links.send_backward(inp.grad)
        if remote:
            assert links is not None
            learn_remote(links.arrived_gradients(), t)
        _after_step(t, stage, spec, stats, result, on_step, stop)
    if remote:
        assert links is not None
        learn_remote(links.drain_gradients(spec.steps), spec.steps)


def _pipelined_loop(stage: Stage, data: Data, spec: TrainSpec, links: Links | None,
                    stats: RankStats, result: RankResult, on_step: StepHook | None,
                    stop: Callable[[], bool] | None) -> None:
    a, b, n = stage.first, stage.last, stage.n
    shapes = stage.model.boundary_shapes
    bsz = data.batch_size
    need_in = stage.needs_input_grad(a)
    need_out = b < n and stage.below[b]
    parts = data.micro(0)
    if links is not None and links.prev is not None:
        links.expect_forward(spec.steps * len(parts))
    for t in range(spec.steps):
        y = data.labels(t)
        x = data.inputs(t) if a == 1 else None
        ins: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        total = 0.0
        for part in parts:
            if x is not None:
                h = x[part]
            else:
                assert links is not None
                h = links.recv_forward((part.stop - part.start, *shapes[a - 1]))
            inp = h.detach().requires_grad_(need_in)
            out = stage.model.run(inp, a, b)
            if b < n:
                assert links is not None
                links.send_forward(out)
                outs.append(out)
            else:
                loss = nn.functional.cross_entropy(out, y[part]) * (
                    (part.stop - part.start) / bsz)
                total += float(loss.detach())
                outs.append(loss)
            ins.append(inp)
        for part, inp, out in zip(reversed(parts), reversed(ins), reversed(outs), strict=True):
            if b == n:
                out.backward()
            elif need_out:
                assert links is not None
                out.backward(links.recv_backward((part.stop - part.start, *shapes[b])))
            if need_in:
                assert links is not None and inp.grad is not None
                links.send_backward(inp.grad)
        for i in range(a, b + 1):
            stage.step(i)
        if b == n:
            result.losses.append(total)
        _after_step(t, stage, spec, stats, result, on_step, stop)


def train_local(model: BlockModel, x: np.ndarray, y: np.ndarray, spec: TrainSpec,
                on_step: StepHook | None = None,
                stop: Callable[[], bool] | None = None) -> RankResult:
    """All blocks in this process, one after another (``workers = 1``): backprop, or the
    same pipelined / synthetic-gradient computation as the workers run, without links."""
    from cloud_trainer.disagg.partition import decoupled_boundaries

    model = copy.deepcopy(model)
    n = model.num_blocks
    local = replace(spec, microbatches=1 if spec.mode == "backprop" else spec.microbatches,
                    boundaries=decoupled_boundaries(spec, n, [(1, n)]))
    stats = RankStats(rank=0, blocks=(1, model.num_blocks))
    return train_rank(model, 1, model.num_blocks, Data(x, y, local), local, None, stats,
                      on_step, stop)
