"""One worker of a disaggregated run, started as
``torchrun ... -m cloud_trainer.training.disagg.worker JOB_DIR``.

Reads the job the trainer wrote, joins the process group, trains its blocks and writes them
back as ``rank-<r>.pt`` (CPU tensors, whichever device it trained on). It writes its pid
first (``rank-<r>.pid``: an operator, or a test, can find the process of a rank) and, on an
exception, the traceback (``rank-<r>.error``).
The last rank reports progress in ``progress.json`` for the trainer to show.

Its backend and device follow ``TrainSpec.device``: gloo on the CPU, or NCCL with this
worker on ``cuda:{LOCAL_RANK}`` (checked again here: a node of a many-node run may have
fewer GPUs than the trainer's).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cloud_trainer.training.disagg.comm import Links
from cloud_trainer.training.disagg.engine import Data, train_rank
from cloud_trainer.training.disagg.placement import check_device, worker_device
from cloud_trainer.training.disagg.spec import RankStats, TrainSpec

log = logging.getLogger("cloud_trainer.training.disagg.worker")
PROGRESS_EVERY_S = 0.5


class ProgressFile:
    """``progress.json`` (steps done, last loss), rewritten at most every half second."""

    def __init__(self, job: Path) -> None:
        self.path, self.last = job / "progress.json", 0.0

    def __call__(self, step: int, loss: float, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "loss": loss}))
            tmp.replace(self.path)


def run(job: Path, rank: int) -> None:
    # the job file is this trainer's own (launch.write_job): it pickles the model whole
    spec_d = torch.load(job / "job.pt", weights_only=False)
    spec = TrainSpec.from_dict(spec_d["spec"])
    rs = [tuple(r) for r in spec_d["ranges"]]
    model = spec_d["model"]
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(spec, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = worker_device(spec, local_rank)
    barrier: dict[str, list[int]] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        barrier = {"device_ids": [local_rank]}  # NCCL's barrier on this rank's own GPU
    dist.init_process_group(spec.backend, timeout=timedelta(seconds=spec.timeout_s))
    if dist.get_world_size() != len(rs):
        raise RuntimeError(f"{dist.get_world_size()} workers joined, the job has {len(rs)}")
    a, b = rs[rank]
    x = np.load(job / "x.npy", mmap_mode="r") if a == 1 else None
    y = np.load(job / "y.npy")
    stats = RankStats(rank=rank, blocks=(a, b))
    links = Links(stats, spec.max_lead if spec.mode == "synthetic-gradients"
                  else spec.max_lead * spec.microbatches, device)
    data = Data(x, y, spec, device)
    write = ProgressFile(job)
    on_step = write if b == model.num_blocks else None
    log.info("rank %d/%d: blocks %d-%d, %s, %d steps on %s (%s)", rank, len(rs), a, b,
             spec.mode, spec.steps, device, spec.backend)
    dist.barrier(**barrier)  # the loops start together: loop_s is comparable between ranks
    result = train_rank(model, a, b, data, spec, links, stats, on_step)
    links.flush()
    result.stats = stats.to_dict()
    dist.barrier(**barrier)
    if on_step is not None and result.losses:
        write(spec.steps, result.losses[-1], True)
    tmp = job / f"rank-{rank}.tmp"
    torch.save(asdict(result), tmp)
    tmp.replace(job / f"rank-{rank}.pt")
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cloud_trainer.training.disagg.worker JOB_DIR (under torchrun)",
              file=sys.stderr)
        return 2
    job = Path(args[0])
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(message)s")
    (job / f"rank-{rank}.pid").write_text(str(os.getpid()))
    try:
        run(job, rank)
    except BaseException:
        (job / f"rank-{rank}.error").write_text(traceback.format_exc())
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
