"""The evaluation gate: better candidates pass, worse ones are rejected with their scores."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.training.gate import evaluate_candidate


def _model(seed: int) -> BlockModel:
    torch.manual_seed(seed)
    return BlockModel([nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3)],
                      input_shape=(4,)).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = _model(0)(x).argmax(1)  # labels = the teacher's decisions
    return x, y


def test_better_candidate_passes_on_teacher_agreement() -> None:
    teacher = _model(0)
    x, _ = _data()
    result = evaluate_candidate(copy.deepcopy(teacher), _model(1), teacher, x)
    assert result.passed and result.metric == "teacher_agreement"
    assert result.candidate_score == 100.0 and result.deployed_score < 100.0
    assert result.samples == 300 and "passed" in result.reason
    json.dumps(result.to_dict())


def test_worse_candidate_is_rejected_with_both_scores_recorded() -> None:
    teacher = _model(0)
    x, y = _data()
    result = evaluate_candidate(_model(1), copy.deepcopy(teacher), teacher, x, y.numpy())
    assert not result.passed and result.metric == "accuracy"
    assert result.deployed_score == 100.0 and result.candidate_score < 100.0
    d = result.to_dict()
    assert d["passed"] is False and d["delta"] < 0 and "rejected" in d["reason"]
    assert json.loads(json.dumps(d)) == d


def test_margin_in_points_and_equal_scores_pass() -> None:
    teacher = _model(0)
    x, y = _data()
    same = evaluate_candidate(copy.deepcopy(teacher), teacher, teacher, x, y)
    assert same.passed and same.delta == 0.0
    worse = evaluate_candidate(_model(1), teacher, teacher, x, y)
    gap = -worse.delta
    assert evaluate_candidate(_model(1), teacher, teacher, x, y, margin=gap + 0.01).passed
    assert not evaluate_candidate(_model(1), teacher, teacher, x, y, margin=gap - 0.5).passed
    with pytest.raises(ValueError, match="margin"):
        evaluate_candidate(teacher, teacher, teacher, x, y, margin=-1)


def test_a_broken_candidate_is_rejected_not_raised() -> None:
    teacher = _model(0)
    x, _ = _data()
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        broken.block(2).weight.fill_(float("nan"))
    result = evaluate_candidate(broken, teacher, teacher, x)
    assert not result.passed and "non-finite" in result.reason
    assert result.to_dict()["candidate_score"] is None
    json.dumps(result.to_dict(), allow_nan=False)


def test_inputs_are_checked() -> None:
    teacher = _model(0)
    x, y = _data()
    with pytest.raises(ValueError, match="labels"):
        evaluate_candidate(teacher, teacher, teacher, x, y[:5])
    with pytest.raises(ValueError, match="teacher"):
        evaluate_candidate(teacher, teacher, None, x)
    with pytest.raises(ValueError, match="held-out"):
        evaluate_candidate(teacher, teacher, teacher, x[:0])


def test_per_device_gate_rejects_a_candidate_that_trades_one_camera_for_the_others() -> None:
    """The pooled score holds, but the outnumbered device gets worse: rejected, with each
    device's scores recorded; devices with too few held-out samples are not gated alone."""
    import numpy as np

    from cloud_trainer.training.gate import DeviceGroups

    teacher, candidate, deployed = _model(0), _model(1), _model(2)
    x, _ = _data()
    with torch.no_grad():
        ref, cand, dep = (m(x).argmax(1).numpy() for m in (teacher, candidate, deployed))
    quiet = np.flatnonzero((dep == ref) & (cand != ref))[:20]
    assert len(quiet) == 20
    devices = np.full(len(x), "busy", dtype=object)
    devices[quiet] = "quiet"
    pooled = evaluate_candidate(candidate, deployed, teacher, x, margin=0.0)
    margin = max(0.0, -pooled.delta) + 0.5  # the pooled check alone passes
    assert evaluate_candidate(candidate, deployed, teacher, x, margin=margin).passed
    gated = evaluate_candidate(candidate, deployed, teacher, x, margin=margin,
                               groups=DeviceGroups(devices, min_samples=10))
    assert not gated.passed and "quiet (0.00 vs 100.00, p=0.000)" in gated.reason
    assert gated.per_device["quiet"] == {"candidate": 0.0, "deployed": 100.0, "samples": 20,
                                         "p_worse": 0.5**20}
    assert gated.per_device["busy"]["samples"] == 280
    few = evaluate_candidate(candidate, deployed, teacher, x, margin=margin,
                             groups=DeviceGroups(devices, min_samples=21))
    assert few.passed and set(few.per_device) == {"busy"}
    json.dumps(gated.to_dict())
    with pytest.raises(ValueError, match="device ids"):
        evaluate_candidate(candidate, deployed, teacher, x, groups=DeviceGroups(devices[:5]))


def test_a_device_losing_a_frame_or_two_is_noise_not_harm() -> None:
    """McNemar's exact test: 1 lost of 1 discordant is p = 0.5; 8 lost, 0 gained is
    p = 1/256; equal losses and gains are never significant."""
    from cloud_trainer.training.gate import mcnemar_worse

    assert mcnemar_worse(0, 0) == 1.0
    assert mcnemar_worse(1, 0) == 0.5
    assert mcnemar_worse(8, 0) == 1 / 256
    assert mcnemar_worse(3, 3) > 0.5
    assert abs(mcnemar_worse(5, 1) - 7 / 64) < 1e-12
