"""Where a disaggregated run computes: ``TrainSpec.device``, checked before any worker starts.

``cpu``: every worker on the CPU, gloo between them (what the tests run). ``cuda``: every
worker on its own GPU, ``cuda:{LOCAL_RANK}``, NCCL between them; its blocks, M blocks,
optimiser state, batches, labels and receive buffers live there, and what it writes back
is moved to the CPU first. NCCL cannot put two ranks on one GPU, so a node needs as many
visible GPUs as it runs workers.
"""

from __future__ import annotations

import os

import torch

from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.training.disagg.spec import TrainSpec


class DeviceUnavailable(KnetTrainerError, RuntimeError):
    """``device = "cuda"`` and this machine cannot give every worker a GPU of its own."""


def check_device(spec: TrainSpec, per_node: int) -> None:
    """Raise ``DeviceUnavailable`` unless ``per_node`` workers of ``spec`` can run here."""
    if spec.device != "cuda":
        return
    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = (f"torch {torch.__version__} was built without CUDA" if built is None else
               f"torch {torch.__version__} (CUDA {built}) sees no GPU")
        raise DeviceUnavailable(
            f'device = "cuda" but {why}: set [training] device = "cpu", or run the trainer '
            "on a machine with NVIDIA GPUs and a CUDA build of torch")
    count = torch.cuda.device_count()
    if count < per_node:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise DeviceUnavailable(
            f'device = "cuda" needs one GPU per worker (NCCL cannot run two ranks on one '
            f"GPU): {per_node} workers on this node, {count} GPU(s) visible{note}; set "
            f"[training] workers to at most {count}, spread the workers over more nodes, "
            'or use device = "cpu"')


def worker_device(spec: TrainSpec, local_rank: int | None = None) -> torch.device:
    """The device of a worker: ``cuda:{local_rank}`` (the current GPU when ``None``) or the
    CPU."""
    if spec.device != "cuda":
        return torch.device("cpu")
    index = torch.cuda.current_device() if local_rank is None else local_rank
    return torch.device("cuda", index)
