"""What a disaggregated training run is asked to do, and what it reports back.

Both travel between the trainer and its ``torchrun`` workers as files (``torch.save`` of plain
dicts), so they stay plain data: no modules, no process-group handles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Mode = Literal["backprop", "pipelined", "synthetic-gradients"]
MODES: tuple[Mode, ...] = ("backprop", "pipelined", "synthetic-gradients")
Decouple = Literal["workers", "blocks"]
Device = Literal["cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("cpu", "cuda")


@dataclass
class TrainSpec:
    """One training run of a block model from labels.

    ``steps`` optimiser steps for every trained block in every mode (equal budgets); a step
    is one mini-batch of ``batch_size`` (pipelined: split into ``microbatches``). The
    synthetic-gradient modules (M blocks) get their own Adam at ``m_lr``; ``conditioned``
    feeds them the label too (cDNI). ``max_lead`` bounds how many batches a worker may run
    ahead of its downstream neighbour (forward back-pressure: memory stays bounded).
    ``frozen`` blocks (1-based) keep their weights but still pass gradients.
    ``decouple``: where M blocks sit — only on the boundaries between workers (blocks on one
    worker backpropagate into each other), or on every block boundary. ``boundaries``, when
    given, names them explicitly (the launcher resolves ``decouple`` into it, so a one-worker
    run can repeat a many-worker run's computation).
    ``partition``: the first block of every worker (None: balanced by measured cost).
    ``optimizer``/``clip``: Adam (the measured default) or SGD with Nesterov momentum, and an
    optional gradient-norm clip per block; ``m_hidden``/``m_layers`` size the M blocks;
    ``m_replay``/``m_replay_steps``: each M block keeps the last ``m_replay`` gradients that
    came back and takes ``m_replay_steps`` extra Adam steps on them per arriving gradient
    (``synthetic.py``; off by default: on ``digits``' balanced split it would make the M
    block on boundary 1 the slowest part of worker 0, where it teaches nothing).
    ``device``: where every worker computes — ``cpu`` (gloo) or ``cuda`` (NCCL, one GPU per
    worker: ``cuda:{LOCAL_RANK}``); ``backend`` follows from it.
    ``delay_s``: extra seconds per step on some ranks (simulates a slow worker in tests).
    ``trust``: scale a block's learning rate by its M block's running cosine similarity
    (``SyntheticGradientTrainer.trust``): a block moves as fast as the gradients it gets
    have lately proven right (with Adam, whose steps ignore the gradient's size, an early M
    block's noise otherwise moves a block at full speed and kills its ReLUs).
    """

    mode: Mode = "synthetic-gradients"
    workers: int = 2
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    clip: float | None = None
    trust: bool = True
    m_lr: float = 3e-3
    seed: int = 0
    shift: int = 0
    microbatches: int = 4
    conditioned: bool = True
    m_hidden: int | None = None
    m_layers: int = 2
    m_replay: int = 0
    m_replay_steps: int = 0
    decouple: Decouple = "workers"
    boundaries: tuple[int, ...] | None = None
    max_lead: int = 4
    frozen: tuple[int, ...] = ()
    checkpoints: tuple[int, ...] = ()
    partition: tuple[int, ...] | None = None
    delay_s: dict[int, float] = field(default_factory=dict)
    threads: int = 1
    timeout_s: float = 300.0  # a link that stays silent this long fails the run
    device: Device = "cpu"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.workers < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("workers, steps and batch_size must be at least 1")
        if self.mode == "backprop" and self.workers != 1:
            raise ValueError("backprop is the single-process reference: workers = 1")
        if self.max_lead < 1 or self.microbatches < 1:
            raise ValueError("max_lead and microbatches must be at least 1")
        if self.m_replay < 0 or self.m_replay_steps < 0 or (self.m_replay_steps
                                                             and not self.m_replay):
            raise ValueError("m_replay_steps needs m_replay >= 1 (neither negative)")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r}: choose from {', '.join(DEVICES)}")

    @property
    def backend(self) -> str:
        """The ``torch.distributed`` backend of the workers: NCCL on GPUs, gloo on CPUs."""
        return "nccl" if self.device == "cuda" else "gloo"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSpec:
        d = dict(d)
        for key in ("frozen", "checkpoints"):
            d[key] = tuple(d.get(key, ()))
        for key in ("partition", "boundaries"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        d["delay_s"] = {int(k): float(v) for k, v in d.get("delay_s", {}).items()}
        return cls(**d)


@dataclass
class RankStats:
    """What one worker measured: why it was fast or slow, and what crossed its links.

    ``backward_waits`` counts blocking waits for a gradient message *inside* the training
    loop (a synthetic-gradient worker must report 0); ``pending_at_forward[t]`` is how many
    of its batches still lacked their true gradient when it started batch ``t``, i.e. how
    far it ran ahead of the backward pass instead of waiting for it.
    """

    rank: int
    blocks: tuple[int, int]
    loop_s: float = 0.0
    cpu_s: float = 0.0
    forward_wait_s: float = 0.0
    backward_wait_s: float = 0.0
    send_wait_s: float = 0.0
    backward_waits: int = 0
    drained_after_loop: int = 0
    bytes_sent: int = 0
    messages_sent: int = 0
    pending_at_forward: list[int] = field(default_factory=list)
    gradient_lag: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
