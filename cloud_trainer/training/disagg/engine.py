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

Everything a rank computes with lives on its device (``placement.worker_device``): its
blocks (moved there before their optimisers exist, so the optimiser state is there too),
its M blocks, each batch and its labels (drawn and shifted on the CPU, as on every rank,
then moved) and the links' receive buffers. Snapshots of the weights are CPU copies: they
are written back with ``torch.save`` and loaded into the trainer's CPU model.
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

from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.training.disagg.comm import Links
from cloud_trainer.training.disagg.placement import worker_device
from cloud_trainer.training.disagg.spec import RankStats, TrainSpec
from cloud_trainer.training.disagg.synthetic import SyntheticGradient, SyntheticGradientTrainer
from cloud_trainer.training.train import random_shift

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
    """A CPU copy of ``module``'s state (wherever the module is)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


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
    """Blocks ``first..last`` of ``model`` on this worker, with their optimisers and M blocks,
    all on ``device`` (the other blocks stay where they are)."""

    def __init__(self, model: BlockModel, first: int, last: int, spec: TrainSpec,
                 device: torch.device) -> None:
        self.model, self.first, self.last, self.spec = model, first, last, spec
        self.device = device
        self.n = model.num_blocks
        self.below = trainable_below(model, spec.frozen)
        self.opts: dict[int, tuple[torch.optim.Optimizer, Any]] = {}
        for i in range(first, last + 1):
            block = model.block(i).to(device)
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
                                      spec.conditioned, spec.m_hidden, spec.m_layers).to(device)
                self.sg[i] = SyntheticGradientTrainer(m, spec.m_lr, replay=spec.m_replay,
                                                      replay_steps=spec.m_replay_steps,
                                                      seed=spec.seed + i)
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
    """Batches for this rank: inputs only where the first block runs, labels everywhere;
    drawn on the CPU (the same on every rank), handed out on ``device`` (default: the
    spec's, ``placement.worker_device``)."""

    def __init__(self, x: np.ndarray | None, y: np.ndarray, spec: TrainSpec,
                 device: torch.device | None = None) -> None:
        self.device = worker_device(spec) if device is None else device
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
        return self.y[self.idx[t]].to(self.device)

    def inputs(self, t: int) -> torch.Tensor:
        assert self.x is not None, "only the first worker reads inputs"
        xb = self.x[self.idx[t]]
        xb = random_shift(xb, self.shift, self.gen) if self.shift else xb
        return xb.to(self.device)

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
    """Train blocks ``first..last`` of ``model`` (in place, moved to ``data.device``) for
    ``spec.steps`` steps; the links, if any, must be on the same device."""
    if links is not None and links.device != data.device:
        raise ValueError(f"links on {links.device}, data on {data.device}")
    stage = Stage(model, first, last, spec, data.device)
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
        from cloud_trainer.training.distill import TrainingInterrupted

        raise TrainingInterrupted("training stopped on request")
    delay = spec.delay_s.get(stats.rank, 0.0)
    if delay:
        time.sleep(delay)  # a deliberately slow worker (tests)


def _sg_loop(stage: Stage, data: Data, spec: TrainSpec, links: Links | None, stats: RankStats,
             result: RankResult, on_step: StepHook | None,
             stop: Callable[[], bool] | None) -> None:
    _SyntheticGradientLoop(stage, data, spec, links, stats, result).run(on_step, stop)


class _SyntheticGradientLoop:
    """One worker's synthetic-gradient loop: its state between steps is the activations
    ``h_b`` (with their labels) sent up whose gradient has not come back yet."""

    def __init__(self, stage: Stage, data: Data, spec: TrainSpec, links: Links | None,
                 stats: RankStats, result: RankResult) -> None:
        self.stage, self.data, self.spec = stage, data, spec
        self.links, self.stats, self.result = links, stats, result
        self.shapes = stage.model.boundary_shapes
        self.sends_up = links is not None and links.next is not None
        # the M block on this worker's top boundary learns from gradients sent back later
        self.remote = self.sends_up and stage.last in stage.sg
        self.waiting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (h_b, y)

    def _links(self) -> Links:
        assert self.links is not None
        return self.links

    def run(self, on_step: StepHook | None, stop: Callable[[], bool] | None) -> None:
        steps, b = self.spec.steps, self.stage.last
        if self.remote:
            self._links().start_gradient_receiver(steps, (self.data.batch_size,
                                                          *self.shapes[b]))
        if self.links is not None and self.links.prev is not None:
            self.links.expect_forward(steps)
        for t in range(steps):
            self._step(t)
            if self.remote:
                self._learn_remote(self._links().arrived_gradients(), t)
            _after_step(t, self.stage, self.spec, self.stats, self.result, on_step, stop)
        if self.remote:
            self._learn_remote(self._links().drain_gradients(steps), steps)

    def _step(self, t: int) -> None:
        """Step ``t``: every segment forward, then at once its update and its input's
        gradient (to the M block below, or sent down)."""
        y = self.data.labels(t)
        if self.remote:
            self.stats.pending_at_forward.append(len(self.waiting))
        h = self._input(t)
        for s, e in self.stage.segments:
            h = self._segment(t, s, e, h, y)

    def _input(self, t: int) -> torch.Tensor:
        a = self.stage.first
        if a == 1:
            return self.data.inputs(t)
        return self._links().recv_forward((self.data.batch_size, *self.shapes[a - 1]))

    def _segment(self, t: int, s: int, e: int, h: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        """Blocks ``s..e`` on ``h``: forward, backward, step; returns their output."""
        stage = self.stage
        inp = h.detach().requires_grad_(stage.needs_input_grad(s))
        out = stage.model.run(inp, s, e)
        trust = 1.0
        if e < stage.n:
            h = out.detach()
            trust = self._boundary(t, e, out, h, y)
        else:
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            self.result.losses.append(float(loss.detach()))
        for i in range(s, e + 1):
            stage.step(i, trust)
        if inp.requires_grad:
            self._input_gradient(s, inp, y)
        return h

    def _boundary(self, t: int, e: int, out: torch.Tensor, h: torch.Tensor,
                  y: torch.Tensor) -> float:
        """Output ``h`` of block ``e`` (not the last): sent up if this worker ends there,
        backpropagated from its M block's prediction if it has one; returns the trust
        scaling the segment's learning rate."""
        stage, top = self.stage, e == self.stage.last
        if top and self.sends_up:
            self._links().send_forward(h)
        if e not in stage.sg:
            return 1.0
        out.backward(stage.sg[e].synthetic(h, y))
        trust = stage.sg[e].trust if self.spec.trust else 1.0
        if top and self.remote:
            self.waiting[t] = (h, y)
        return trust

    def _input_gradient(self, s: int, inp: torch.Tensor, y: torch.Tensor) -> None:
        assert inp.grad is not None
        if s > self.stage.first:  # the boundary below is on this worker: its M learns now
            self.stage.sg[s - 1].learn(inp.detach(), y, inp.grad)
        else:
            self._links().send_backward(inp.grad)

    def _learn_remote(self, items: list[tuple[int, torch.Tensor]], now: int) -> None:
        """The top M block learns from the gradients that came back for steps ``s``."""
        for s, grad in items:
            h_s, y_s = self.waiting.pop(s)
            self.stage.sg[self.stage.last].learn(h_s, y_s, grad)
            self.stats.gradient_lag.append(now - s)


def _pipelined_loop(stage: Stage, data: Data, spec: TrainSpec, links: Links | None,
                    stats: RankStats, result: RankResult, on_step: StepHook | None,
                    stop: Callable[[], bool] | None) -> None:
    _PipelinedLoop(stage, data, links, result).run(spec, stats, on_step, stop)


class _PipelinedLoop:
    """One worker's GPipe loop: every micro-batch forward, then every one backward, then one
    optimiser step per block."""

    def __init__(self, stage: Stage, data: Data, links: Links | None,
                 result: RankResult) -> None:
        self.stage, self.data, self.links, self.result = stage, data, links, result
        self.shapes = stage.model.boundary_shapes
        self.last = stage.last == stage.n
        self.need_in = stage.needs_input_grad(stage.first)
        self.need_out = stage.last < stage.n and stage.below[stage.last]
        self.parts = data.micro(0)

    def _links(self) -> Links:
        assert self.links is not None
        return self.links

    def run(self, spec: TrainSpec, stats: RankStats, on_step: StepHook | None,
            stop: Callable[[], bool] | None) -> None:
        if self.links is not None and self.links.prev is not None:
            self.links.expect_forward(spec.steps * len(self.parts))
        for t in range(spec.steps):
            ins, outs, total = self._forward(t)
            self._backward(ins, outs)
            for i in range(self.stage.first, self.stage.last + 1):
                self.stage.step(i)
            if self.last:
                self.result.losses.append(total)
            _after_step(t, self.stage, spec, stats, self.result, on_step, stop)

    def _forward(self, t: int) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
        """Every micro-batch of step ``t`` forward: their inputs, their outputs (the loss
        on the last worker) and the batch's loss."""
        a, b = self.stage.first, self.stage.last
        y = self.data.labels(t)
        x = self.data.inputs(t) if a == 1 else None
        ins: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        total = 0.0
        for part in self.parts:
            size = part.stop - part.start
            if x is not None:
                h = x[part]
            else:
                h = self._links().recv_forward((size, *self.shapes[a - 1]))
            inp = h.detach().requires_grad_(self.need_in)
            out = self.stage.model.run(inp, a, b)
            if not self.last:
                self._links().send_forward(out)
                outs.append(out)
            else:
                loss = nn.functional.cross_entropy(out, y[part]) * (size / self.data.batch_size)
                total += float(loss.detach())
                outs.append(loss)
            ins.append(inp)
        return ins, outs, total

    def _backward(self, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """The micro-batches backward, last first: gradients from above (or the loss) in,
        their input gradients sent down."""
        b = self.stage.last
        for part, inp, out in zip(reversed(self.parts), reversed(ins), reversed(outs),
                                  strict=True):
            if self.last:
                out.backward()
            elif self.need_out:
                out.backward(self._links().recv_backward((part.stop - part.start,
                                                          *self.shapes[b])))
            if self.need_in:
                assert inp.grad is not None
                self._links().send_backward(inp.grad)


def train_local(model: BlockModel, x: np.ndarray, y: np.ndarray, spec: TrainSpec,
                on_step: StepHook | None = None,
                stop: Callable[[], bool] | None = None) -> RankResult:
    """All blocks in this process, one after another (``workers = 1``): backprop, or the
    same pipelined / synthetic-gradient computation as the workers run, without links."""
    from cloud_trainer.training.disagg.partition import decoupled_boundaries

    model = copy.deepcopy(model)
    n = model.num_blocks
    local = replace(spec, microbatches=1 if spec.mode == "backprop" else spec.microbatches,
                    boundaries=decoupled_boundaries(spec, n, [(1, n)]))
    stats = RankStats(rank=0, blocks=(1, model.num_blocks))
    return train_rank(model, 1, model.num_blocks, Data(x, y, local), local, None, stats,
                      on_step, stop)
