"""Block-wise knowledge transfer: mechanics of independent, label-free block training."""

import numpy as np
import torch
from torch import nn

from cloud_trainer.blocks import BlockModel
from cloud_trainer.distill import distill_from_inputs, teacher_boundaries, train_blockwise


def chain(width: int, seed: int) -> BlockModel:
    torch.manual_seed(seed)
    return BlockModel([
        nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 5), nn.ReLU()),
        nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, 4), nn.ReLU()),
        nn.Sequential(nn.Linear(4, 3)),
    ], input_shape=(6,)).eval()


def block_error(student: BlockModel, teacher: BlockModel, acts: dict, i: int) -> float:
    with torch.no_grad():
        x = acts[i - 1]
        return float(((student.block(i)(x) - teacher.block(i)(x)) ** 2).mean())


def test_each_block_learns_its_teacher_block_without_labels() -> None:
    teacher, student = chain(32, 0), chain(8, 1)
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(3))
    acts = teacher_boundaries(teacher, x)
    before = [block_error(student, teacher, acts, i) for i in (1, 2)]
    result = distill_from_inputs(teacher, student, x, epochs=40, lr=1e-2, seed=0)
    after = [block_error(result.student, teacher, acts, i) for i in (1, 2)]
    assert all(a < b / 3 for a, b in zip(after, before, strict=True))
    assert result.trained == [1, 2, 3] and not result.frozen
    with torch.no_grad():  # the chain now agrees with the teacher far more often
        agree = (result.student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agree > 0.8


def test_without_raw_inputs_block_one_stays_frozen_and_that_is_reported() -> None:
    teacher, student = chain(32, 0), chain(8, 1)
    x = torch.randn(128, 6)
    acts = teacher_boundaries(teacher, x)
    uplinked = {1: acts[1].numpy(), 2: acts[2].numpy()}  # no boundary 0 left the device
    result = train_blockwise(teacher, student, uplinked, epochs=2, seed=0)
    assert result.trained == [2, 3]
    assert "raw inputs" in result.frozen[1]
    for name, p in student.block(1).state_dict().items():
        assert torch.equal(result.student.block(1).state_dict()[name], p)


def test_training_one_block_touches_no_other_block_nor_the_deployed_model() -> None:
    teacher, student = chain(32, 0), chain(8, 1)
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    acts = {1: np.random.default_rng(0).random((64, 5), dtype=np.float32)}
    result = train_blockwise(teacher, student, acts, blocks=[2], epochs=3, seed=0)
    assert result.trained == [2] and result.frozen[3] == "not selected"
    for k, v in student.state_dict().items():
        assert torch.equal(v, snapshot[k])  # the deployed student is untouched
    new = result.student.state_dict()
    assert not torch.equal(new["blocks.1.0.weight"], snapshot["blocks.1.0.weight"])
    assert torch.equal(new["blocks.0.0.weight"], snapshot["blocks.0.0.weight"])
    assert torch.equal(new["blocks.2.0.weight"], snapshot["blocks.2.0.weight"])


def test_same_seed_same_result() -> None:
    teacher, student = chain(32, 0), chain(8, 1)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    a = distill_from_inputs(teacher, student, x, epochs=2, seed=5).student
    b = distill_from_inputs(teacher, student, x, epochs=2, seed=5).student
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
