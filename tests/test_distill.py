"""Block-wise knowledge transfer: local, label-free, independent per block, never in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.training.distill import (
    boundary_activations,
    boundary_mse,
    kd_loss,
    train_blockwise,
    train_logit_kd,
    train_student_blockwise_from_inputs,
)


def _teacher() -> BlockModel:
    torch.manual_seed(0)
    model = BlockModel([
        nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 4)),
    ], input_shape=(6,))
    for m in model.modules():  # He init: torch's default makes near-constant logits here
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():  # centre the logits so every class occurs
        model.block(3)[0].bias -= model.eval()(_inputs(1024, seed=123)).mean(0)
    return model


def _student(seed: int = 1) -> BlockModel:
    torch.manual_seed(seed)
    return BlockModel([
        nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 4)),
    ], input_shape=(6,)).eval()


def _inputs(n: int = 256, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def _agreement(a: BlockModel, b: BlockModel, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def test_every_block_loss_falls_and_the_deployed_student_is_untouched() -> None:
    teacher, student = _teacher(), _student()
    before = _state(student)
    acts = boundary_activations(student, _inputs())
    result = train_blockwise(teacher, student, acts, epochs=15, lr=1e-2, seed=0)
    assert result.trained == [1, 2, 3] and result.frozen == {}
    for i in result.trained:
        assert result.loss_after[i] < 0.6 * result.loss_before[i], i
    assert _same(before, _state(student))  # returns a new student
    assert result.student is not student
    assert not any(m.training for m in result.student.modules())
    d = result.to_dict()
    assert set(d) >= {"trained", "frozen", "loss_before", "loss_after", "seconds"}


def test_without_raw_inputs_block_1_stays_frozen_bit_identical_and_says_why() -> None:
    teacher, student = _teacher(), _student()
    acts = boundary_activations(student, _inputs())
    del acts[0]
    result = train_blockwise(teacher, student, acts, epochs=3, seed=0)
    assert result.trained == [2, 3]
    assert "boundary 0" in result.frozen[1]
    new, old = _state(result.student), _state(student)
    assert _same(new, old, "blocks.0.")
    assert not _same(new, old, "blocks.1.") and not _same(new, old, "blocks.2.")


def test_only_blocks_with_their_input_boundary_train_and_others_do_not_move() -> None:
    teacher, student = _teacher(), _student()
    acts = boundary_activations(student, _inputs())
    result = train_blockwise(teacher, student, {1: acts[1]}, epochs=3, seed=0)
    assert result.trained == [2]
    assert set(result.frozen) == {1, 3} and "boundary 2" in result.frozen[3]
    new, old = _state(result.student), _state(student)
    assert _same(new, old, "blocks.0.") and _same(new, old, "blocks.2.")
    assert not _same(new, old, "blocks.1.")
    chosen = train_blockwise(teacher, student, acts, blocks=[3], epochs=3, seed=0)
    assert chosen.trained == [3] and chosen.frozen[2] == "not selected"


def test_a_block_trains_the_same_alone_or_with_others_and_with_workers() -> None:
    """Independence by construction: a block sees only its own inputs and targets."""
    teacher, student = _teacher(), _student()
    acts = boundary_activations(student, _inputs())
    alone = train_blockwise(teacher, student, acts, blocks=[2], epochs=3, seed=4)
    together = train_blockwise(teacher, student, acts, epochs=3, seed=4)
    parallel = train_blockwise(teacher, student, acts, epochs=3, seed=4, workers=3)
    a, t, p = (_state(r.student) for r in (alone, together, parallel))
    assert _same(a, t, "blocks.1.")
    assert all(torch.equal(t[k], p[k]) for k in t)


def test_deterministic_for_a_seed() -> None:
    teacher, student = _teacher(), _student()
    x = _inputs(128)
    r1 = train_student_blockwise_from_inputs(teacher, student, x, epochs=2, seed=7)
    r2 = train_student_blockwise_from_inputs(teacher, student, x, epochs=2, seed=7)
    r3 = train_student_blockwise_from_inputs(teacher, student, x, epochs=2, seed=8)
    s1, s2, s3 = (_state(r.student) for r in (r1, r2, r3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_a_degraded_student_recovers_from_unlabeled_device_activations() -> None:
    teacher = _teacher()
    x = _inputs(512)
    good = train_student_blockwise_from_inputs(
        teacher, _student(), x, epochs=30, lr=1e-2, seed=0).student
    degraded = copy.deepcopy(good)
    with torch.no_grad():  # corrupt blocks 2 and 3 as a bad update or drift would
        g = torch.Generator().manual_seed(3)
        for i in (2, 3):
            for p in degraded.block(i).parameters():
                p.add_(0.6 * torch.randn(p.shape, generator=g))
    held_out = _inputs(512, seed=9)
    acts = boundary_activations(degraded, x)  # what devices send, no raw inputs, no labels
    del acts[0]
    fixed = train_blockwise(teacher, degraded, acts, epochs=20, lr=1e-2, seed=0).student
    before = boundary_mse(teacher, degraded, held_out)
    after = boundary_mse(teacher, fixed, held_out)
    assert after[1] == before[1]  # block 1 could not train (no raw inputs)
    # The chain's own activations and logits move back towards the teacher's on unseen
    # inputs. (Argmax agreement is too coarse for this random teacher's near-tied logits.)
    assert after[2] < 0.25 * before[2] and after[3] < 0.25 * before[3], (before, after)


@pytest.mark.parametrize("inputs", ["teacher", "student", "student+boundary"])
def test_from_inputs_modes_train_every_block(inputs: str) -> None:
    teacher, student = _teacher(), _student()
    r = train_student_blockwise_from_inputs(teacher, student, _inputs(), inputs=inputs,
                                            epochs=10, lr=1e-2, seed=0)
    assert r.trained == [1, 2, 3]
    # In "student" mode later blocks' inputs and targets move while training, so only
    # block 1 has a fixed objective to compare before and after.
    fixed = [1] if inputs == "student" else r.trained
    assert all(r.loss_after[i] < r.loss_before[i] for i in fixed)
    with pytest.raises(ValueError, match="inputs"):
        train_student_blockwise_from_inputs(teacher, student, _inputs(), inputs="oracle")


def test_labels_add_cross_entropy_and_must_align() -> None:
    teacher, student = _teacher(), _student()
    x = _inputs()
    with torch.no_grad():
        y = teacher(x).argmax(1)
    acts = boundary_activations(student, x)
    r = train_blockwise(teacher, student, acts, labels=y, epochs=5, lr=1e-2, seed=0)
    assert r.loss_after[3] < r.loss_before[3]
    with pytest.raises(ValueError, match="labels"):
        train_blockwise(teacher, student, acts, labels=y[:10], epochs=1)


def test_logit_kd_baseline_and_mismatched_pairs() -> None:
    teacher, student = _teacher(), _student()
    x = _inputs()
    kd = train_logit_kd(teacher, student, x, None, epochs=10, lr=1e-2, seed=0)
    assert _agreement(kd, teacher, x) > _agreement(student, teacher, x)
    other = BlockModel([nn.Linear(6, 5), nn.Linear(5, 4)], input_shape=(6,))
    with pytest.raises(ValueError, match="boundaries"):
        train_blockwise(teacher, other, {0: x})
    logits = torch.randn(4, 10)
    assert float(kd_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_unlabeled_rows_get_kd_only_and_labelled_rows_add_cross_entropy() -> None:
    from cloud_trainer.training.distill import UNLABELED, logits_loss

    g = torch.Generator().manual_seed(0)
    out, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    kw = {"temperature": 4.0, "alpha": 0.25}
    kd = kd_loss(out, t, 4.0)
    full = logits_loss(out, t, y, **kw)
    assert float(full) == pytest.approx(float(
        0.25 * kd + 0.75 * nn.functional.cross_entropy(out, y)))
    part = y.clone()
    part[2:] = UNLABELED
    expect = 0.25 * kd + 0.75 * nn.functional.cross_entropy(out[:2], y[:2])
    assert float(logits_loss(out, t, part, **kw)) == pytest.approx(float(expect))
    none = torch.full_like(y, UNLABELED)
    assert float(logits_loss(out, t, none, **kw)) == pytest.approx(float(0.25 * kd))
    assert float(logits_loss(out, t, None, **kw)) == pytest.approx(float(kd))


def test_partially_labelled_inputs_train_and_stay_deterministic() -> None:
    from cloud_trainer.training.distill import UNLABELED

    teacher, student = _teacher(), _student()
    x = _inputs(128)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    y[16:] = UNLABELED
    runs = [train_student_blockwise_from_inputs(teacher, student, x, labels=y, epochs=3,
                                                lr=1e-2, seed=1) for _ in range(2)]
    a, b = (_state(r.student) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(r.loss_after[3] < r.loss_before[3] for r in runs)
    kd = train_logit_kd(teacher, student, x, y, epochs=3, lr=1e-2, seed=1)
    assert _agreement(kd, teacher, x) > _agreement(student, teacher, x)


def _count_training_steps(model: BlockModel) -> list[int]:
    """Counts forward passes of ``model``'s last block in training mode (one per optimiser
    step in every trainer here). Hooks travel with the deep copies the trainers make."""
    calls = [0]

    def hook(module: nn.Module, args: object, output: object) -> None:
        if module.training:
            calls[0] += 1

    model.block(model.num_blocks).register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("finetune", [0, 2, 5])
def test_every_recipe_takes_the_same_number_of_steps(finetune: int) -> None:
    """Equal budget: the block-wise stage plus the end-to-end stage make as many optimiser
    steps as logit KD over the same data (5 epochs of ⌈100/32⌉ = 4 batches)."""
    teacher, student = _teacher(), _student()
    x = _inputs(100)
    calls = _count_training_steps(student)
    train_student_blockwise_from_inputs(teacher, student, x, epochs=5, batch_size=32,
                                        finetune_epochs=finetune, seed=0)
    bkt, calls[0] = calls[0], 0
    train_logit_kd(teacher, student, x, None, epochs=5, batch_size=32, seed=0)
    assert bkt == calls[0] == 5 * 4


def test_finetune_stage_is_end_to_end_deterministic_and_validated() -> None:
    teacher, student = _teacher(), _student()
    x = _inputs(256)
    kw = {"epochs": 6, "lr": 1e-2, "seed": 0}
    plain = train_student_blockwise_from_inputs(teacher, student, x, **kw)
    tuned = [train_student_blockwise_from_inputs(teacher, student, x, finetune_epochs=3,
                                                 hint_weight=1.0, **kw) for _ in range(2)]
    a, b, p = _state(tuned[0].student), _state(tuned[1].student), _state(plain.student)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], p[k]) for k in a)
    assert not any(m.training for m in tuned[0].student.modules())
    no_hint = train_student_blockwise_from_inputs(teacher, student, x, finetune_epochs=3, **kw)
    assert not all(torch.equal(a[k], v) for k, v in _state(no_hint.student).items())
    assert tuned[0].loss_after[3] < tuned[0].loss_before[3]
    with pytest.raises(ValueError, match="finetune_epochs"):
        train_student_blockwise_from_inputs(teacher, student, x, epochs=2, finetune_epochs=3)


def test_normalized_mse_is_scale_free() -> None:
    from cloud_trainer.training.distill import normalized_mse

    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 8, generator=g)
    assert float(normalized_mse(t.mean() + 0 * t, t)) == pytest.approx(
        float(t.var(unbiased=False) / t.var()), rel=1e-5)
    noise = 0.1 * torch.randn(64, 8, generator=g)
    assert float(normalized_mse(t + noise, t)) == pytest.approx(
        float(normalized_mse(100 * (t + noise), 100 * t)), rel=1e-5)


def test_bench_transfer_sets_are_stratified_nested_and_equal_budget() -> None:
    import numpy as np

    from bench.distill import BATCH, epochs_for, transfer_set
    from cloud_trainer.models.data import digits_splits

    y = digits_splits().y_train
    small, big = transfer_set(200, seed=3), transfer_set(400, seed=3)
    assert len(small) == 200 and np.bincount(y[small]).tolist() == [20] * 10
    assert set(small) <= set(big)
    assert np.array_equal(small, transfer_set(200, seed=3))
    assert not np.array_equal(small, transfer_set(200, seed=4))
    assert len(transfer_set(10_000, seed=0)) == len(y)
    assert epochs_for(200, 600) * -(-200 // BATCH) == 600
    assert epochs_for(len(y), 600) * -(-len(y) // BATCH) == 600


@pytest.mark.parametrize("how", ["blockwise", "from_inputs"])
def test_training_stops_between_steps_when_asked(how: str) -> None:
    """A trainer shutting down (SIGTERM) must not wait for a whole run: ``stop`` is polled
    before every optimiser step and the caller's student is left untouched."""
    from cloud_trainer.training.distill import TrainingInterrupted

    teacher, student = _teacher(), _student()
    before = copy.deepcopy(student.state_dict())
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(1))
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) > 3  # three steps, then the trainer says stop

    with pytest.raises(TrainingInterrupted):
        if how == "blockwise":
            train_blockwise(teacher, student, {0: x}, epochs=50, batch_size=16, stop=stop)
        else:
            train_student_blockwise_from_inputs(teacher, student, x, epochs=50, batch_size=16,
                                                stop=stop)
    assert len(polls) == 4  # not one step more
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_blocks_only_run_and_frozen_batch_norms_keep_their_statistics() -> None:
    """A block copied whole from the teacher stays bit-identical (``freeze``), and with
    ``bn_frozen`` no batch norm's running statistics move while its affine weights train."""
    torch.manual_seed(0)
    teacher = BlockModel([
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 4)),
    ], input_shape=(6,)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # damage blocks 2-3 only
        for i in (2, 3):
            for p in student.block(i).parameters():
                p.add_(0.3 * torch.randn_like(p))
    before = _state(student)
    res = train_student_blockwise_from_inputs(teacher, student, _inputs(), epochs=3,
                                              batch_size=32, freeze=[1], bn_frozen=True,
                                              inputs="student+boundary")
    after = _state(res.student)
    assert res.trained == [2, 3] and 1 in res.frozen
    assert _same(before, after, "blocks.0.")  # block 1: untouched
    for k in before:
        if "running_" in k:
            assert torch.equal(before[k], after[k]), k  # statistics kept
    assert not torch.equal(before["blocks.1.1.weight"], after["blocks.1.1.weight"])
    assert res.loss_after[2] < res.loss_before[2]
