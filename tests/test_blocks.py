"""BlockModel and ModelPair: wrapping users' models, shapes, modes, pairs."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cloud_trainer.models.blocks import BlockModel, BlockModelError, ModelPair

DOCS = Path(__file__).resolve().parent.parent / "docs" / "models.md"


def user_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 5),
    )


def test_wrap_a_users_sequential_by_cut_points() -> None:
    seq = user_model().eval()
    model = BlockModel.from_sequential(seq, cuts=[3, 5], input_shape=(3, 16, 16))
    assert model.num_blocks == 3 and model.num_classes == 5
    assert model.boundary_shapes == ((3, 16, 16), (8, 16, 16), (16, 8, 8), (5,))
    assert model.params() == sum(p.numel() for p in seq.parameters())
    assert model.params(1) == 3 * 8 * 9 + 8 + 2 * 8
    assert model.block(3)[1] is seq[6]  # shared layers, not copies
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), seq(x))
        assert torch.allclose(model.run(model.run(x, 1, 1), 2, 3), seq(x))
        acts = model.boundaries(x)
    assert [tuple(a.shape[1:]) for a in acts] == list(model.boundary_shapes)


def test_slices_take_the_sequentials_mode_and_eval_reaches_every_block() -> None:
    seq = user_model().eval()
    model = BlockModel.from_sequential(seq, cuts=[3, 5], input_shape=(3, 16, 16))
    # nn.Sequential slices are new containers created in training mode: must not leak.
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_wrap_a_list_of_modules_with_declared_shapes() -> None:
    blocks = [nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5)), nn.Linear(4, 2)]
    model = BlockModel(blocks, input_shape=(6,), shapes=[(6,), (4,), (2,)])
    model.eval()
    assert all(not m.training for m in model.modules())
    x = torch.randn(3, 6)
    assert torch.equal(model(x), model(x))  # dropout off in eval
    with pytest.raises(BlockModelError, match="declared"):
        BlockModel([nn.Linear(6, 4)], input_shape=(6,), shapes=[(6,), (5,)])


def test_blocks_that_do_not_fit_are_refused_with_the_block_named() -> None:
    with pytest.raises(BlockModelError, match="block 2"):
        BlockModel([nn.Linear(6, 4), nn.Linear(5, 2)], input_shape=(6,))
    with pytest.raises(BlockModelError, match="increasing"):
        BlockModel.from_sequential(user_model(), cuts=[5, 3], input_shape=(3, 16, 16))
    with pytest.raises(BlockModelError, match="increasing"):
        BlockModel.from_sequential(user_model(), cuts=[7], input_shape=(3, 16, 16))
    with pytest.raises(BlockModelError, match="at least one"):
        BlockModel([], input_shape=(6,))


def test_run_checks_its_range() -> None:
    model = BlockModel([nn.Linear(6, 4), nn.Linear(4, 2)], input_shape=(6,))
    with pytest.raises(IndexError):
        model.run(torch.zeros(1, 6), 0, 1)
    with pytest.raises(IndexError):
        model.run(torch.zeros(1, 4), 2, 3)
    with pytest.raises(IndexError):
        model.block(3)


def test_a_pair_needs_identical_boundaries_and_adapters_live_in_the_student() -> None:
    teacher = BlockModel([nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()),
                          nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 3))],
                         input_shape=(1, 4, 4))
    student = BlockModel([nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(4, 32, 1)),  # adapter to the boundary
                          nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 3))],
                         input_shape=(1, 4, 4))
    pair = ModelPair("toy", teacher=teacher, student=student)
    assert pair.num_classes == 3 and pair.num_blocks == 2
    assert pair.boundary_shapes == teacher.boundary_shapes
    narrow = BlockModel([nn.Conv2d(1, 4, 3, padding=1),
                         nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 3))],
                        input_shape=(1, 4, 4))
    with pytest.raises(BlockModelError, match="boundaries differ"):
        ModelPair("toy", teacher=teacher, student=narrow)
    with pytest.raises(BlockModelError, match="num_classes"):
        ModelPair("toy", teacher=teacher, student=student, num_classes=10)


def test_a_chain_without_logits_has_no_num_classes() -> None:
    model = BlockModel([nn.Conv2d(1, 2, 3, padding=1)], input_shape=(1, 4, 4))
    assert model.num_classes is None


def test_dry_run_leaves_batchnorm_statistics_untouched() -> None:
    seq = user_model()
    before = seq[1].running_mean.clone()
    model = BlockModel.from_sequential(seq, cuts=[3], input_shape=(3, 16, 16))
    assert torch.equal(seq[1].running_mean, before)
    assert seq.training and model.training  # the caller's mode is kept


def test_the_documented_example_runs() -> None:
    code = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert code, "docs/models.md lost its example"
    exec(compile(code[0], str(DOCS), "exec"), {})
