"""The evaluation gate: a retrained student is pushed only if it is no worse than the deployed one.

Both models are scored on the same held-out inputs: accuracy where labels exist, otherwise
top-1 agreement with the teacher (the only reference on unlabeled edge data). A candidate
passes iff ``candidate_score >= deployed_score - margin`` (scores and margin in points).
A candidate that produces non-finite outputs or the wrong output shape is rejected outright.

Per-device gate (optional): a fleet's pooled score can rise while one camera, outnumbered by
the others, gets worse. Given each held-out sample's device, the candidate is rejected if on
any device with at least ``min_samples`` held-out samples it scores below ``deployed -
margin`` *and* that loss is significant: McNemar's exact test on the samples where exactly
one of the two models is right, one-sided, p < ``alpha``. A device holds few held-out
samples (one frame of 15 is 6.7 points), so a loss of a frame or two is noise, not harm.
The scheduler records every result, rejected ones included, and never pushes a rejected one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from cloud_trainer.models.blocks import BlockModel

log = logging.getLogger(__name__)
_EPS = 1e-9  # float slack when comparing scores that are ratios of counts
_CHUNK = 512


@dataclass(frozen=True)
class GateResult:
    passed: bool
    metric: str  # "accuracy" (labels) or "teacher_agreement" (none)
    candidate_score: float  # points, 0..100
    deployed_score: float
    margin: float  # points the candidate may lose
    samples: int
    reason: str
    # device -> {"candidate": points, "deployed": points, "samples": n}; empty without groups
    per_device: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def delta(self) -> float:
        return self.candidate_score - self.deployed_score

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; a score that could not be measured is ``None``, not NaN."""
        out = {**asdict(self), "delta": self.delta}
        return {k: None if isinstance(v, float) and v != v else v for k, v in out.items()}


@dataclass(frozen=True)
class DeviceGroups:
    """Which device each held-out sample came from, and the fewest samples that make a
    device's score worth gating on (fewer: one frame swings it by several points)."""

    devices: np.ndarray  # (N,) str, aligned with the held-out inputs
    min_samples: int = 10
    alpha: float = 0.1  # significance of a device's loss (McNemar, one-sided)


@torch.no_grad()
def predictions(model: BlockModel, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Top-1 classes; raises ``ValueError`` on non-finite logits (a broken candidate)."""
    model.eval()
    xt = x.detach().float() if isinstance(x, torch.Tensor) else torch.from_numpy(
        np.array(x, dtype=np.float32))
    out = torch.cat([model(xt[i : i + _CHUNK]) for i in range(0, len(xt), _CHUNK)])
    if out.ndim != 2:
        raise ValueError(f"expected (N, classes) logits, got shape {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise ValueError("non-finite outputs")
    return out.argmax(1).numpy()


def _score(pred: np.ndarray, reference: np.ndarray) -> float:
    return float((pred == reference).mean() * 100.0)


def evaluate_candidate(candidate: BlockModel, deployed: BlockModel, teacher: BlockModel | None,
                       x_holdout: np.ndarray | torch.Tensor,
                       y_holdout: np.ndarray | None = None, *,
                       margin: float = 0.0, groups: DeviceGroups | None = None) -> GateResult:
    """Score candidate and deployed student on held-out data and decide whether to push."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0 points, got {margin}")
    if len(x_holdout) == 0:
        raise ValueError("the gate needs at least one held-out sample")
    if candidate.boundary_shapes != deployed.boundary_shapes:
        raise ValueError("candidate and deployed model have different boundaries")
    if y_holdout is not None:
        reference, metric = np.asarray(y_holdout), "accuracy"
        if len(reference) != len(x_holdout):
            raise ValueError(f"{len(reference)} labels for {len(x_holdout)} inputs")
    elif teacher is None:
        raise ValueError("without labels the gate needs the teacher as reference")
    else:
        reference, metric = predictions(teacher, x_holdout), "teacher_agreement"
    if groups is not None and len(groups.devices) != len(reference):
        raise ValueError(f"{len(groups.devices)} device ids for {len(reference)} inputs")
    dep_pred = predictions(deployed, x_holdout)
    deployed_score = _score(dep_pred, reference)
    try:
        cand_pred = predictions(candidate, x_holdout)
    except ValueError as exc:
        return _decide(False, metric, float("nan"), deployed_score, margin, len(reference),
                       f"candidate rejected: {exc}")
    candidate_score = _score(cand_pred, reference)
    passed = candidate_score + _EPS >= deployed_score - margin
    word = "passed" if passed else "rejected"
    reason = (f"candidate {word}: {metric} {candidate_score:.2f} vs deployed "
              f"{deployed_score:.2f} (margin {margin:.2f} points, {len(reference)} samples)")
    per_device = _per_device(cand_pred, dep_pred, reference, groups)
    alpha = groups.alpha if groups is not None else 0.0
    worse = sorted(d for d, s in per_device.items()
                   if s["candidate"] + _EPS < s["deployed"] - margin and s["p_worse"] < alpha)
    if passed and worse:
        passed = False
        reason = (f"candidate rejected: {metric} {candidate_score:.2f} vs deployed "
                  f"{deployed_score:.2f} pooled, but worse beyond the margin on "
                  + ", ".join(f"{d} ({per_device[d]['candidate']:.2f} vs "
                              f"{per_device[d]['deployed']:.2f}, p={per_device[d]['p_worse']:.3f})"
                              for d in worse))
    return _decide(passed, metric, candidate_score, deployed_score, margin, len(reference),
                   reason, per_device)


def _per_device(cand: np.ndarray, dep: np.ndarray, reference: np.ndarray,
                groups: DeviceGroups | None) -> dict[str, dict[str, float]]:
    if groups is None:
        return {}
    out = {}
    for device in sorted(set(groups.devices.tolist())):
        sel = groups.devices == device
        n = int(sel.sum())
        if n >= groups.min_samples:
            c_ok, d_ok = cand[sel] == reference[sel], dep[sel] == reference[sel]
            out[str(device)] = {"candidate": _score(cand[sel], reference[sel]),
                                "deployed": _score(dep[sel], reference[sel]), "samples": n,
                                "p_worse": mcnemar_worse(int((d_ok & ~c_ok).sum()),
                                                         int((c_ok & ~d_ok).sum()))}
    return out


def mcnemar_worse(lost: int, gained: int) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: the chance of ``lost``
    or more of the ``lost + gained`` discordant samples going against it if both models
    were equally good (a fair coin per discordant sample)."""
    n = lost + gained
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2.0**n


def _decide(passed: bool, metric: str, cand: float, dep: float, margin: float, n: int,
            reason: str, per_device: dict[str, dict[str, float]] | None = None) -> GateResult:
    result = GateResult(passed=passed, metric=metric, candidate_score=cand,
                        deployed_score=dep, margin=float(margin), samples=n, reason=reason,
                        per_device=per_device or {})
    (log.info if passed else log.warning)("gate: %s", reason)
    return result
