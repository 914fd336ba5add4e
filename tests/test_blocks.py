import pytest
import torch
from torch import nn

from cloud_trainer.blocks import BlockModel, BlockModelError, ModelPair


def user_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 5),
    )


def test_wrap_a_users_sequential_by_cut_points() -> None:
    seq = user_model().eval()
    model = BlockModel.from_sequential(seq, cuts=[3, 5], input_shape=(3, 16, 16))
    assert model.num_blocks == 3
    assert model.boundary_shapes == ((3, 16, 16), (8, 16, 16), (16, 8, 8), (5,))
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), seq(x))
        assert torch.allclose(model.run(model.run(x, 1, 1), 2, 3), seq(x))
        acts = model.boundaries(x)
    assert [tuple(a.shape[1:]) for a in acts] == list(model.boundary_shapes)


def test_wrap_a_list_of_modules_and_eval_reaches_every_block() -> None:
    blocks = [nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5)), nn.Linear(4, 2)]
    model = BlockModel(blocks, input_shape=(6,))
    model.eval()
    assert all(not m.training for m in model.modules())
    model.train()
    assert model.block(1)[1].training


def test_blocks_that_do_not_fit_are_refused_with_the_block_named() -> None:
    with pytest.raises(BlockModelError, match="block 2"):
        BlockModel([nn.Linear(6, 4), nn.Linear(5, 2)], input_shape=(6,))
    with pytest.raises(BlockModelError, match="increasing"):
        BlockModel.from_sequential(user_model(), cuts=[5, 3], input_shape=(3, 16, 16))


def test_a_pair_needs_identical_boundaries() -> None:
    a = BlockModel([nn.Linear(6, 4), nn.Linear(4, 2)], input_shape=(6,))
    b = BlockModel([nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)),
                    nn.Linear(4, 2)], input_shape=(6,))
    pair = ModelPair("toy", teacher=b, student=a)
    assert pair.size_reduction > 0.5
    c = BlockModel([nn.Linear(6, 3), nn.Linear(3, 2)], input_shape=(6,))
    with pytest.raises(BlockModelError, match="boundaries differ"):
        ModelPair("toy", teacher=b, student=c)


def test_dry_run_leaves_batchnorm_statistics_untouched() -> None:
    seq = user_model()
    before = seq[1].running_mean.clone()
    BlockModel.from_sequential(seq, cuts=[3], input_shape=(3, 16, 16))
    assert torch.equal(seq[1].running_mean, before)
    assert seq.training  # the caller's mode is restored
