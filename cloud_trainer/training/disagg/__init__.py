"""Disaggregated training: a block model trained from labels with its blocks on different
worker processes (``torch.distributed``, started by ``torchrun``).

Three modes of one trainer (``TrainSpec.mode``): ``backprop`` (one process, the reference),
``pipelined`` (GPipe micro-batches across workers, true gradients, workers wait for them)
and ``synthetic-gradients`` (Decoupled Neural Interfaces, Jaderberg et al. 2017, as
KnowledgeNet uses them: a worker updates its blocks with a predicted gradient and never
waits for the true one). ``train_disaggregated`` runs one; ``WorkerFailed`` is what a
killed or failing worker turns into. ``engine`` holds the loops, ``comm`` the links,
``synthetic`` the M blocks, ``partition`` the split of blocks over workers, ``launch`` the
``torchrun`` side, ``worker`` its entry point, ``candidate`` the retraining hook,
``placement`` the device (``TrainSpec.device``: ``cpu`` with gloo, ``cuda`` with NCCL).
"""

from cloud_trainer.training.disagg.launch import TrainResult, WorkerFailed, train_disaggregated
from cloud_trainer.training.disagg.placement import DeviceUnavailable
from cloud_trainer.training.disagg.spec import MODES, Mode, TrainSpec

__all__ = ["MODES", "DeviceUnavailable", "Mode", "TrainResult", "TrainSpec", "WorkerFailed",
           "train_disaggregated"]
