"""The retraining job's from-labels path: a candidate trained by ``[training] mode``.

What the labels are: ``Sample.label``, set by an operator on an uplinked frame (the agent's
``input`` messages carry it). A label names the class of the frame, so it supervises every
block above the boundary the sample was taken at: with raw inputs (boundary 0) the whole
chain, with boundary ``b`` blocks ``b+1..N`` (blocks ``1..b`` stay as deployed: nothing
reaches them). Unlabelled samples are left out; a run with no labelled sample fails with
``MissingLabels`` instead of training on nothing.

The candidate then goes through the job's gate, export, signing and push like any other.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.training.disagg.launch import train_disaggregated
from cloud_trainer.training.disagg.spec import TrainSpec

if TYPE_CHECKING:
    from cloud_trainer.trainer_config import TrainingSection

log = logging.getLogger(__name__)


class MissingLabels(KnetTrainerError, ValueError):
    """A from-labels training mode, and no labelled training sample in the run's window."""


@dataclass
class LabelledCandidate:
    model: BlockModel
    trained: list[int]
    frozen: dict[int, str]
    loss_before: dict[int, float] = field(default_factory=dict)
    loss_after: dict[int, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def tail_of(model: BlockModel, boundary: int) -> BlockModel:
    """Blocks ``boundary+1..N`` as a model of their own (copies)."""
    blocks = [copy.deepcopy(model.block(i)) for i in range(boundary + 1, model.num_blocks + 1)]
    return BlockModel(blocks, model.boundary_shapes[boundary])


@torch.no_grad()
def chain_loss(model: BlockModel, x: np.ndarray, y: np.ndarray, chunk: int = 512) -> float:
    """Mean cross-entropy of ``model`` on ``x``, ``y`` in eval mode."""
    model.eval()
    total = 0.0
    for k in range(0, len(x), chunk):
        out = model(torch.from_numpy(np.array(x[k : k + chunk], np.float32)))
        total += float(nn.functional.cross_entropy(out, torch.from_numpy(y[k : k + chunk]),
                                                   reduction="sum"))
    return total / max(1, len(x))


def train_from_labels(deployed: BlockModel, x: np.ndarray, labels: np.ndarray | None,
                      boundary: int, t: TrainingSection,
                      progress: Callable[[str, int, int, float], None] | None = None,
                      stop: Callable[[], bool] | None = None) -> LabelledCandidate:
    """Train blocks ``boundary+1..N`` of a copy of ``deployed`` on the labelled rows of ``x``
    (boundary-``boundary`` activations) as ``t.mode``, ``t.workers`` and ``t.device`` say."""
    n = deployed.num_blocks
    have = labels is not None and (labels >= 0).any()
    if not have:
        raise MissingLabels(f"mode {t.mode} trains from operator labels, and none of the run's "
                            f"{len(x)} training samples has one (label uplinked frames, or "
                            "use mode = blockwise-kt)")
    assert labels is not None
    keep = labels >= 0
    xs, ys = np.asarray(x)[keep], labels[keep]
    if t.batch_norm == "frozen":
        log.warning("batch_norm = frozen is not applied in mode %s", t.mode)
    allowed = set(t.blocks) if t.blocks is not None else set(range(1, n + 1))
    frozen = {i: ("no raw inputs (boundary 0) were uplinked" if i == 1 else
                  f"boundary {boundary} is the lowest uplinked") for i in range(1, boundary + 1)}
    frozen.update({i: "not selected" for i in range(boundary + 1, n + 1) if i not in allowed})
    trained = [i for i in range(boundary + 1, n + 1) if i not in frozen]
    if not trained:
        raise ValueError(f"no block above boundary {boundary} may change (training.blocks)")
    tail = tail_of(deployed, boundary)
    steps = t.epochs * -(-len(xs) // min(t.batch_size, len(xs)))
    spec = TrainSpec(mode=t.mode, workers=t.workers, steps=steps, batch_size=t.batch_size,  # type: ignore[arg-type]
                     lr=t.lr, seed=t.seed, device=t.device, m_replay=t.m_replay,
                     m_replay_steps=t.m_replay_steps,
                     frozen=tuple(i - boundary for i in frozen if i > boundary))
    before = chain_loss(tail, xs, ys)
    log.info("training blocks %s from %d labelled samples (%d unlabelled left out): %s, "
             "%d workers, %d steps", trained, len(xs), int((~keep).sum()), t.mode,
             spec.workers, steps)
    res = train_disaggregated(tail, xs, ys, spec, progress=progress, stop=stop)
    out = copy.deepcopy(deployed)
    for k in range(1, res.model.num_blocks + 1):
        out.block(boundary + k).load_state_dict(res.model.block(k).state_dict())
    after = chain_loss(res.model, xs, ys)
    info = {"mode": t.mode, "workers": res.spec.workers, "device": t.device, "steps": steps,
            "labelled": len(xs), "unlabelled": int((~keep).sum()),
            "partition": [[boundary + a, boundary + b] for a, b in res.ranges],
            "synthetic_boundaries": [boundary + i for i in res.spec.boundaries or ()],
            "m_replay": res.spec.m_replay, "m_replay_steps": res.spec.m_replay_steps,
            "samples_per_s": round(res.samples_per_s, 1),
            "bytes_per_step": res.bytes_per_step, "train_s": round(res.wall_s, 2)}
    return LabelledCandidate(out.eval(), trained, frozen, {n: before}, {n: after}, info)
