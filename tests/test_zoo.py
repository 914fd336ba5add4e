import numpy as np
import pytest
import torch

from cloud_trainer.data import digits_splits, vision_frames
from cloud_trainer.zoo import get_pair, zoo_names


@pytest.mark.parametrize("name", zoo_names())
def test_pairs_share_boundaries_and_the_student_is_much_smaller(name: str) -> None:
    pair = get_pair(name)
    assert pair.teacher.boundary_shapes == pair.student.boundary_shapes
    assert pair.num_blocks >= (3 if name == "digits" else 4)
    # KnowledgeNet's figure: the student has at least 62 % fewer parameters.
    assert pair.size_reduction >= 0.62


def test_vision_is_a_96px_rgb_chain() -> None:
    assert get_pair("vision").student.boundary_shapes[0] == (3, 96, 96)


@pytest.mark.parametrize("name", zoo_names())
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    a, b, c = get_pair(name, 3), get_pair(name, 3), get_pair(name, 4)
    for x, y in zip(a.student.state_dict().values(), b.student.state_dict().values(),
                    strict=True):
        assert torch.equal(x, y)
    w = next(iter(a.student.parameters()))
    assert not torch.equal(w, next(iter(c.student.parameters())))


def test_digits_split_is_real_stratified_and_fixed() -> None:
    s = digits_splits()
    assert s.x_train.shape[1:] == (1, 8, 8) and s.x_train.dtype == np.float32
    assert len(s.x_train) + len(s.x_test) == 1797
    assert s.x_test.min() >= 0.0 and s.x_test.max() <= 1.0
    assert set(np.unique(s.y_test)) == set(range(10))
    assert digits_splits() is s


def test_vision_frames_come_from_the_bundled_photos() -> None:
    x, y = vision_frames(16, seed=1)
    assert x.shape == (16, 3, 96, 96) and x.dtype == np.float32
    assert set(y) <= set(range(8))
    x2, _ = vision_frames(16, seed=1)
    assert np.array_equal(x, x2)
    assert x.std() > 0.3  # real pictures, not constant frames


@pytest.mark.slow
def test_trained_digits_pair_reaches_high_accuracy(tmp_path) -> None:
    from cloud_trainer.train import evaluate, trained_pair

    pair = trained_pair("digits", seed=0, cache=tmp_path)
    s = digits_splits()
    assert evaluate(pair.teacher, s.x_test, s.y_test) > 0.97
    assert evaluate(pair.student, s.x_test, s.y_test) > 0.95
    again = trained_pair("digits", seed=0, cache=tmp_path)  # from the cache
    assert torch.equal(again.student.block(1)[0].weight, pair.student.block(1)[0].weight)
