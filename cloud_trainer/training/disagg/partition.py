"""Which worker runs which blocks: contiguous ranges with the slowest worker as fast as it can be.

A pipeline runs at the pace of its slowest worker, so the split decides the throughput.
Costs are measured, not guessed from parameter counts: a conv block's cost grows with its
spatial size, a linear block's with its weights. An M block costs as much as a block (its
forward, plus a forward and backward to learn), and it runs on the worker that owns the
block below its boundary; with ``decouple = "workers"`` only the cuts have one, so where
the cuts go changes the cost of the workers on both sides.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time

import torch

from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.training.disagg.spec import TrainSpec
from cloud_trainer.training.disagg.synthetic import SyntheticGradient, SyntheticGradientTrainer


def _median_time(fn: object, repeats: int) -> float:
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        if r:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_costs(model: BlockModel, spec: TrainSpec,
               repeats: int = 7) -> tuple[list[float], list[float]]:
    """Seconds per training step of each block (forward and backward) and of an M block on
    each boundary 1..N-1 (predict, then learn; 0 where the mode has none), median of
    ``repeats`` on ``spec.threads`` threads like a worker."""
    model = copy.deepcopy(model).train()
    b = spec.batch_size
    shapes = model.boundary_shapes
    y = torch.zeros(b, dtype=torch.long)
    old = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    blocks, ms = [], []
    try:
        for i in range(1, model.num_blocks + 1):
            block = model.block(i)
            x = torch.rand(b, *shapes[i - 1], requires_grad=i > 1)

            def run_block() -> None:
                out = block(x)  # noqa: B023
                out.backward(torch.ones_like(out))
                block.zero_grad(set_to_none=True)  # noqa: B023
                x.grad = None  # noqa: B023

            blocks.append(_median_time(run_block, repeats))
            if spec.mode != "synthetic-gradients" or i == model.num_blocks:
                ms.append(0.0)
                continue
            sg = SyntheticGradientTrainer(
                SyntheticGradient(shapes[i], model.num_classes, spec.conditioned,
                                  spec.m_hidden, spec.m_layers), spec.m_lr,
                replay=spec.m_replay, replay_steps=spec.m_replay_steps)
            h = torch.rand(b, *shapes[i])
            ms.append(_median_time(lambda: sg.learn(h, y, sg.synthetic(h, y)), repeats))  # noqa: B023
    finally:
        torch.set_num_threads(old)
    return blocks, ms[:-1]


def worker_costs(blocks: list[float], ms: list[float], firsts: tuple[int, ...],
                 decouple: str) -> list[float]:
    """Seconds per step of each worker for a partition (``ms[i-1]``: M block on boundary i)."""
    n = len(blocks)
    out = []
    for a, last in ranges(firsts, n):
        cost = sum(blocks[a - 1 : last])
        for i in range(a, last + 1):
            if i < n and (decouple == "blocks" or i == last):
                cost += ms[i - 1] if i - 1 < len(ms) else 0.0
        out.append(cost)
    return out


def balanced_partition(blocks: list[float], ms: list[float], workers: int,
                       decouple: str = "workers") -> tuple[int, ...]:
    """First block (1-based) of each of ``workers`` contiguous ranges, minimising the
    slowest worker's cost (every split is tried: a model has a handful of blocks)."""
    n = len(blocks)
    if not 1 <= workers <= n:
        raise ValueError(f"{workers} workers for {n} blocks")
    best: tuple[float, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(2, n + 1), workers - 1):
        firsts = (1, *cuts)
        worst = max(worker_costs(blocks, ms, firsts, decouple))
        if best is None or worst < best[0]:
            best = (worst, firsts)
    assert best is not None
    return best[1]


def ranges(firsts: tuple[int, ...], num_blocks: int) -> list[tuple[int, int]]:
    """``(first, last)`` per worker from the first blocks."""
    ends = [*firsts[1:], num_blocks + 1]
    out = [(a, e - 1) for a, e in zip(firsts, ends, strict=True)]
    if firsts[0] != 1 or any(a > b for a, b in out):
        raise ValueError(f"partition {firsts} does not cover blocks 1..{num_blocks}")
    return out


def decoupled_boundaries(spec: TrainSpec, num_blocks: int,
                         worker_ranges: list[tuple[int, int]]) -> tuple[int, ...]:
    """The boundaries that get an M block: ``spec.boundaries`` if given, else every block
    boundary (``decouple = "blocks"``) or the cuts between workers; the cuts always (a
    worker never waits for the true gradient of the next)."""
    if spec.mode != "synthetic-gradients":
        return ()
    cuts = {last for _, last in worker_ranges[:-1]}
    if spec.boundaries is not None:
        chosen = set(spec.boundaries)
    elif spec.decouple == "blocks":
        chosen = set(range(1, num_blocks))
    else:
        chosen = set()
    bad = sorted(i for i in chosen if not 1 <= i < num_blocks)
    if bad:
        raise ValueError(f"boundaries {bad} are not between blocks 1..{num_blocks}")
    return tuple(sorted(chosen | cuts))
