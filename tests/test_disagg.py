"""Disaggregated training (cloud_trainer/training/disagg): the three modes learn with two gloo
ranks under torchrun, the synthetic-gradient worker never waits for a backward message, a
failing worker is named, and the parts (partition, M blocks, config, labels) do what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_trainer.models.data import digits_splits
from cloud_trainer.models.zoo import get_pair
from cloud_trainer.trainer_config import TrainingSection
from cloud_trainer.training.disagg import TrainSpec, WorkerFailed, train_disaggregated
from cloud_trainer.training.disagg.candidate import MissingLabels, train_from_labels
from cloud_trainer.training.disagg.launch import describe_failure
from cloud_trainer.training.disagg.partition import balanced_partition, decoupled_boundaries, ranges
from cloud_trainer.training.disagg.synthetic import SyntheticGradient, SyntheticGradientTrainer
from cloud_trainer.training.train import evaluate

STEPS = 60


# Like the workers: tiny tensors on a shared two-core machine (train.training_context).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _learns(losses: list[float], accuracy: float) -> None:
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert accuracy > 0.6, accuracy  # chance is 0.1


@pytest.mark.slow
def test_three_modes_learn_on_two_gloo_ranks_and_synthetic_gradients_never_wait() -> None:
    s = digits_splits()
    init = get_pair("digits", 0).student
    common = {"steps": STEPS, "batch_size": 32, "lr": 3e-3, "partition": (1, 2)}
    results = {}
    for mode in ("backprop", "pipelined", "synthetic-gradients"):
        # rank 1 is made the slow one, so rank 0 is always ahead of its gradients
        spec = TrainSpec(mode=mode, workers=1 if mode == "backprop" else 2,  # type: ignore[arg-type]
                         delay_s={1: 0.01} if mode == "synthetic-gradients" else {}, **common)
        r = train_disaggregated(init, s.x_train, s.y_train, spec)
        results[mode] = r
        _learns(r.losses, evaluate(r.model, s.x_test, s.y_test))
        assert len(r.losses) == STEPS
    bp, pp, sg = results["backprop"], results["pipelined"], results["synthetic-gradients"]
    assert len(bp.stats) == 1 and bp.bytes_per_step == 0
    assert [s["blocks"] for s in pp.stats] == [(1, 1), (2, 4)] == [tuple(r) for r in sg.ranges]
    # pipelined backprop waits for every micro-batch's gradient; synthetic gradients never
    first = pp.stats[0]
    assert first["backward_waits"] == STEPS * pp.spec.microbatches
    rank0 = sg.stats[0]
    assert rank0["backward_waits"] == 0 and rank0["backward_wait_s"] == 0
    assert max(rank0["pending_at_forward"]) >= 1  # started batches before their gradient came
    assert len(rank0["gradient_lag"]) > STEPS // 2  # ... and used them inside the loop
    assert sg.spec.boundaries == (1,) and set(sg.cosines) == {1}
    assert len(sg.cosines[1]) == STEPS  # the M block learnt from every true gradient
    # activations forward, gradients backward: two (32, 16, 8, 8) float32 tensors a step
    assert sg.bytes_per_step == pp.bytes_per_step == 2 * 32 * 16 * 8 * 8 * 4
    fresh = get_pair("digits", 0).student  # the argument is untouched
    assert torch.equal(init.block(1)[0].weight, fresh.block(1)[0].weight)


def test_partition_balances_measured_costs_with_the_m_blocks_of_the_cuts() -> None:
    blocks, ms = [10.0, 20.0, 0.5, 0.2], [10.0, 15.0, 2.0]
    # M blocks only on the cut: block 1 + M1 = 20 against 20.7
    assert balanced_partition(blocks, ms, 2, "workers") == (1, 2)
    assert balanced_partition(blocks, [0.0] * 3, 2) == (1, 2)  # 10 against 20.7
    assert ranges((1, 2, 3, 4), 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    spec = TrainSpec(mode="synthetic-gradients", workers=2)
    assert decoupled_boundaries(spec, 4, ranges((1, 3), 4)) == (2,)
    every = TrainSpec(mode="synthetic-gradients", workers=2, decouple="blocks")
    assert decoupled_boundaries(every, 4, ranges((1, 3), 4)) == (1, 2, 3)
    with pytest.raises(ValueError, match="does not cover"):
        ranges((2, 3), 4)


def test_an_m_block_learns_a_label_dependent_gradient_and_is_trusted_for_it() -> None:
    torch.manual_seed(0)
    m = SyntheticGradientTrainer(SyntheticGradient((8, 4, 4), 10), lr=3e-3)
    # a per-class, per-channel part (what a label can say) plus a part linear in h; tiny,
    # like gradients deep in a network
    w = (torch.randn(10, 8, 1, 1) * 1e-4).expand(10, 8, 4, 4)
    for _ in range(200):
        h, y = torch.rand(32, 8, 4, 4), torch.randint(0, 10, (32,))
        m.learn(h, y, w[y] + 1e-5 * h)
    assert m.cosines[0] == 0  # the last layer starts at zero: no gradient before learning
    assert np.mean(m.cosines[-20:]) > 0.9 and m.trust > 0.8
    h, y = torch.rand(64, 8, 4, 4), torch.randint(0, 10, (64,))
    g = m.synthetic(h, y)  # at the true gradient's scale, not the normalised one
    assert g.shape == h.shape
    assert torch.nn.functional.cosine_similarity(g.flatten(), (w[y] + 1e-5 * h).flatten(),
                                                 dim=0) > 0.9
    assert 0.5 < float(g.norm() / (w[y] + 1e-5 * h).norm()) < 1.5


def test_a_replaying_m_block_steps_on_recent_gradients_and_keeps_only_the_last_few() -> None:
    torch.manual_seed(0)
    w = torch.randn(10, 8, 1, 1).expand(10, 8, 4, 4)
    plain = SyntheticGradientTrainer(SyntheticGradient((8, 4, 4), 10), lr=3e-3)
    replaying = SyntheticGradientTrainer(SyntheticGradient((8, 4, 4), 10), lr=3e-3,
                                         replay=4, replay_steps=3)
    for _ in range(30):
        h, y = torch.rand(16, 8, 4, 4), torch.randint(0, 10, (16,))
        plain.learn(h, y, w[y])
        replaying.learn(h, y, w[y])
    assert (plain.updates, replaying.updates) == (30, 120)
    assert len(replaying.recent) == 4 and len(replaying.cosines) == 30  # one per arrival
    # the extra steps on recent targets are what make it learn faster (synthetic.py)
    assert np.mean(replaying.cosines[-5:]) > np.mean(plain.cosines[-5:]) + 0.1
    with pytest.raises(ValueError, match="m_replay"):
        TrainSpec(m_replay_steps=3)


TORCHRUN_FAILURE = """
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
======================================================
cloud_trainer.training.disagg.worker FAILED
------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-04_09:14:37
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7748)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 7748
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_09:14:37
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 7749)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 7749
======================================================
"""


def test_a_failed_worker_is_named_with_its_blocks_and_how_it_ended(tmp_path: Path) -> None:
    rs = [(1, 1), (2, 4)]
    (tmp_path / "torchrun.log").write_text(TORCHRUN_FAILURE)
    e = describe_failure(tmp_path, rs, 1)
    assert isinstance(e, WorkerFailed) and (e.rank, e.exitcode) == (1, -9)
    assert str(e) == "worker rank 1 (blocks 2-4) was killed by SIGKILL; the run is abandoned"
    # the killed rank is the cause even when torchrun saw the other's broken link first
    swapped = TORCHRUN_FAILURE.replace("rank      : 1", "rank      : 9").replace(
        "rank      : 0", "rank      : 1").replace("rank      : 9", "rank      : 0")
    swapped = swapped.replace("-15 (pid", "-X").replace("-9 (pid", "1 (pid").replace(
        "-X", "-9 (pid")
    (tmp_path / "torchrun.log").write_text(swapped)
    (tmp_path / "rank-0.error").write_text("Traceback ...\nPeerLost: link failed")
    e = describe_failure(tmp_path, rs, 1)
    assert (e.rank, e.exitcode) == (1, -9), str(e)
    (tmp_path / "torchrun.log").write_text(TORCHRUN_FAILURE.replace("-9 (pid", "1 (pid")
                                           .replace("-15 (pid", "1 (pid"))
    (tmp_path / "rank-1.error").write_text("Traceback ...\nValueError: bad batch")
    assert str(describe_failure(tmp_path, rs, 1)) == (
        "worker rank 1 (blocks 2-4) failed with exit code 1: ValueError: bad batch")


def test_training_mode_config_and_a_job_without_labels_fails_clearly() -> None:
    assert TrainingSection().mode == "blockwise-kt" and TrainingSection().workers == 1
    TrainingSection(mode="synthetic-gradients", workers=4)
    with pytest.raises(ValueError, match="only for mode = pipelined or synthetic-gradients"):
        TrainingSection(mode="backprop", workers=2)
    with pytest.raises(ValueError):
        TrainingSection(mode="dni")  # type: ignore[arg-type]
    student = get_pair("digits", 0).student
    x = digits_splits().x_train[:50]
    t = TrainingSection(mode="synthetic-gradients", workers=2)
    with pytest.raises(MissingLabels, match="none of the run's 50 training samples"):
        train_from_labels(student, x, None, 0, t)
    with pytest.raises(MissingLabels):
        train_from_labels(student, x, np.full(50, -1), 0, t)


def test_from_labels_trains_only_the_blocks_above_the_boundary_in_one_process() -> None:
    s = digits_splits()
    deployed = get_pair("digits", 0).student.eval()
    x2 = deployed.run(torch.from_numpy(np.array(s.x_train[:256])), 1, 2).detach().numpy()
    y = np.array(s.y_train[:256])
    y[::4] = -1  # a quarter unlabelled: left out
    t = TrainingSection(mode="backprop", epochs=2, batch_size=32, blocks=[4])
    res = train_from_labels(deployed, x2, y, 2, t)
    assert res.trained == [4] and sorted(res.frozen) == [1, 2, 3]
    assert res.info["labelled"] == 192 and res.info["unlabelled"] == 64
    for i in (1, 2, 3):
        for a, b in zip(res.model.block(i).state_dict().values(),
                        deployed.block(i).state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(res.model.block(4)[0].weight, deployed.block(4)[0].weight)
    assert res.loss_after[4] < res.loss_before[4]
