"""Start a disaggregated training run: in this process (one worker) or under ``torchrun``.

The trainer writes the job (spec, the model, its inputs and labels) to a directory and runs
``python -m torch.distributed.run ... -m cloud_trainer.training.disagg.worker DIR`` — torch's own
elastic launcher, so the same command spans machines (``--nnodes``, a rendezvous host:port,
the directory on shared storage). Each worker writes its trained blocks back; this process
assembles the model. While it waits it forwards progress and honours ``stop`` (SIGTERM to
the launcher, which stops its workers).

A worker that dies (killed, out of memory, an exception) makes ``torchrun`` stop the others
and exit non-zero; ``WorkerFailed`` then names the rank, its blocks and how it ended, and
nothing trained is returned, so a caller's registry stays as it was.

``device = "cuda"`` is checked here, before anything starts: ``DeviceUnavailable`` if torch
sees no GPU, or fewer GPUs than this machine's workers (NCCL: one GPU per rank).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.training.disagg.engine import RankResult, State, train_local
from cloud_trainer.training.disagg.partition import (
    balanced_partition,
    decoupled_boundaries,
    ranges,
    step_costs,
)
from cloud_trainer.training.disagg.placement import check_device
from cloud_trainer.training.disagg.spec import TrainSpec

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, float], None]
REPO_ROOT = Path(__file__).resolve().parents[3]
POLL_S = 0.1


class WorkerFailed(KnetTrainerError, RuntimeError):
    """A worker process of a disaggregated run failed or was killed; nothing was trained."""

    def __init__(self, message: str, rank: int | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


@dataclass
class TrainResult:
    """The trained model and what every worker measured."""

    model: BlockModel
    spec: TrainSpec  # as run: partition and boundaries resolved
    ranges: list[tuple[int, int]]
    losses: list[float]
    cosines: dict[int, list[float]]
    checkpoints: dict[int, dict[int, State]] = field(default_factory=dict)
    m_checkpoints: dict[int, dict[int, State]] = field(default_factory=dict)
    stats: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0  # the whole call: launch, rendezvous, training, collection

    @property
    def loop_s(self) -> float:
        """The training loops' wall time (the slowest rank: they start on a barrier)."""
        return max(s["loop_s"] for s in self.stats)

    @property
    def samples_per_s(self) -> float:
        return self.spec.steps * self.spec.batch_size / self.loop_s

    @property
    def bytes_per_step(self) -> float:
        """Payload bytes sent between ranks per step, all links and directions."""
        return sum(s["bytes_sent"] for s in self.stats) / self.spec.steps


def resolve(model: BlockModel, spec: TrainSpec) -> tuple[TrainSpec, list[tuple[int, int]]]:
    """The spec as it will run: ``workers`` capped at the blocks, a partition (balanced on
    measured costs unless given) and the decoupled boundaries."""
    n = model.num_blocks
    workers = 1 if spec.mode == "backprop" else min(spec.workers, n)
    if workers < spec.workers:
        log.warning("%d workers asked for a %d-block model: using %d", spec.workers, n, n)
    if spec.partition is not None and len(spec.partition) == workers:
        firsts = spec.partition
    elif workers == 1:
        firsts = (1,)
    else:
        blocks, ms = step_costs(model, spec)
        firsts = balanced_partition(blocks, ms, workers, spec.decouple)
        log.info("block step costs %s ms, M blocks %s ms: workers start at blocks %s",
                 [round(1000 * c, 2) for c in blocks], [round(1000 * c, 2) for c in ms],
                 firsts)
    rs = ranges(firsts, n)
    spec = replace(spec, workers=workers, partition=firsts,
                   boundaries=decoupled_boundaries(spec, n, rs))
    return spec, rs


def train_disaggregated(model: BlockModel, x: np.ndarray, y: np.ndarray, spec: TrainSpec, *,
                        progress: Progress | None = None, stop: Callable[[], bool] | None = None,
                        nnodes: int = 1, rdzv_endpoint: str | None = None,
                        workdir: Path | None = None) -> TrainResult:
    """Train ``model`` (a copy; the argument is untouched) on ``x``, ``y`` as ``spec`` says.

    One worker (or ``backprop``) runs here; more run as ``torchrun`` workers on this machine
    (``nnodes = 1``) or this machine's share of them (the other nodes run the same
    ``torchrun_command`` against the same ``workdir`` and ``rdzv_endpoint``).
    Raises ``DeviceUnavailable`` before starting anything if ``spec.device`` is ``cuda`` and
    this machine lacks a GPU per worker, ``WorkerFailed`` if a worker fails and
    ``TrainingInterrupted`` on ``stop``.
    """
    t0 = time.perf_counter()
    spec, rs = resolve(model, spec)
    check_device(spec, -(-spec.workers // nnodes) if spec.workers > 1 else 1)  # per node
    if spec.workers == 1:
        def on_step(step: int, loss: float) -> None:
            if progress is not None and (step % 10 == 0 or step == spec.steps):
                progress(spec.mode, step, spec.steps, loss)

        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            old = torch.get_num_threads()
            torch.set_num_threads(spec.threads)
            try:
                r = train_local(model, x, y, spec, on_step, stop)
            finally:
                torch.set_num_threads(old)
        return _assemble(model, spec, rs, [r], time.perf_counter() - t0)
    own = workdir is None
    job = Path(tempfile.mkdtemp(prefix="knet-disagg-")) if workdir is None else workdir
    try:
        write_job(job, model, x, y, spec, rs)
        results = _run_torchrun(job, spec, rs, progress, stop, nnodes, rdzv_endpoint)
        return _assemble(model, spec, rs, results, time.perf_counter() - t0)
    finally:
        if own:
            shutil.rmtree(job, ignore_errors=True)


def write_job(job: Path, model: BlockModel, x: np.ndarray, y: np.ndarray, spec: TrainSpec,
              rs: list[tuple[int, int]]) -> None:
    """What every worker reads. The model is pickled whole (its classes must import on the
    workers); the file is this trainer's own, in a private temporary directory."""
    job.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec.to_dict(), "ranges": rs, "model": model}, job / "job.pt")
    np.save(job / "x.npy", np.ascontiguousarray(x, np.float32))
    np.save(job / "y.npy", np.asarray(y, np.int64))


def torchrun_command(job: Path, workers: int, nnodes: int = 1,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """``torchrun`` for this machine's workers (``workers / nnodes`` of them)."""
    if workers % nnodes:
        raise ValueError(f"{workers} workers do not divide over {nnodes} nodes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", str(workers // nnodes), "--max-restarts", "0",
           "--monitor-interval", "0.1"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")  # a c10d store on a free port, chosen by the OS
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need a rendezvous endpoint (host:port)")
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", job.name]
    return [*cmd, "-m", "cloud_trainer.training.disagg.worker", str(job)]


def _run_torchrun(job: Path, spec: TrainSpec, rs: list[tuple[int, int]],
                  progress: Progress | None, stop: Callable[[], bool] | None, nnodes: int,
                  rdzv_endpoint: str | None) -> list[RankResult]:
    from cloud_trainer.training.distill import TrainingInterrupted

    cmd = torchrun_command(job, spec.workers, nnodes, rdzv_endpoint)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT),
                                                     os.environ.get("PYTHONPATH")) if p)}
    log.info("starting %d workers: %s", spec.workers, " ".join(cmd))
    logfile = job / "torchrun.log"
    with logfile.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    seen = 0
    try:
        while proc.poll() is None:
            if stop is not None and stop():
                _terminate(proc)
                raise TrainingInterrupted("disaggregated training stopped on request")
            seen = _report(job, spec, progress, seen)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            _terminate(proc)
    _report(job, spec, progress, seen)
    if proc.returncode != 0:
        raise describe_failure(job, rs, proc.returncode)
    return [RankResult(**torch.load(job / f"rank-{r}.pt", weights_only=True))
            for r in range(len(rs))]


def _report(job: Path, spec: TrainSpec, progress: Progress | None, seen: int) -> int:
    if progress is None:
        return seen
    try:
        p = json.loads((job / "progress.json").read_text())
    except (OSError, ValueError):
        return seen
    if p["step"] > seen:
        progress(spec.mode, int(p["step"]), spec.steps, float(p["loss"]))
    return max(seen, int(p["step"]))


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the launcher's process group (torchrun stops its workers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def describe_failure(job: Path, rs: list[tuple[int, int]], code: int) -> WorkerFailed:
    """Which worker failed and how, from torchrun's failure report and the error files.

    A rank killed by a signal is the cause even when torchrun saw another first: the others
    then fail on their broken links, or get torchrun's own SIGTERM as it stops them.
    """
    def blocks(rank: int) -> str:
        a, b = rs[rank] if 0 <= rank < len(rs) else (0, 0)
        return f"block {a}" if a == b else f"blocks {a}-{b}"

    log_file = job / "torchrun.log"
    text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    report = text[text.rfind("Failures:"):] if "Failures:" in text else ""
    found = [(int(r), int(c)) for r, c in _FAILURE.findall(report)]
    root = text[text.rfind("Root Cause"):] if "Root Cause" in text else ""
    m = _FAILURE.search(root)
    killed = [(r, c) for r, c in found if c < 0 and c != -signal.SIGTERM]
    pick = killed[0] if killed else ((int(m.group(1)), int(m.group(2))) if m else None)
    if pick is None:
        tail = " | ".join(text.strip().splitlines()[-5:])
        return WorkerFailed(f"torchrun exited with {code}: {tail}", None, code)
    rank, exitcode = pick
    if exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
        return WorkerFailed(f"worker rank {rank} ({blocks(rank)}) was {how}; the run is "
                            "abandoned", rank, exitcode)
    err = job / f"rank-{rank}.error"
    last = err.read_text().strip().splitlines()[-1] if err.is_file() else ""
    return WorkerFailed(f"worker rank {rank} ({blocks(rank)}) failed with exit code "
                        f"{exitcode}{': ' + last if last else ''}", rank, exitcode)


def _assemble(model: BlockModel, spec: TrainSpec, rs: list[tuple[int, int]],
              results: list[RankResult], wall_s: float) -> TrainResult:
    import copy

    out = copy.deepcopy(model)
    merged: dict[int, dict[int, State]] = {}
    m_merged: dict[int, dict[int, State]] = {}
    losses: list[float] = []
    cosines: dict[int, list[float]] = {}
    for r in sorted(results, key=lambda r: r.rank):
        for i, state in r.states.items():
            out.block(int(i)).load_state_dict(state)
        for step, states in r.checkpoints.items():
            merged.setdefault(int(step), {}).update({int(i): s for i, s in states.items()})
        for step, states in r.m_checkpoints.items():
            m_merged.setdefault(int(step), {}).update({int(i): s for i, s in states.items()})
        losses += r.losses
        cosines.update({int(i): c for i, c in r.cosines.items()})
    return TrainResult(out.eval(), spec, rs, losses, cosines, merged, m_merged,
                       [r.stats for r in results], wall_s)
