"""The model zoo, its bundled data, and deterministic, cached training."""

import time

import numpy as np
import pytest
import torch

from cloud_trainer.models.data import VISION_CLASSES, digits_splits, vision_frames
from cloud_trainer.models.zoo import get_pair, zoo_entry, zoo_names


def test_the_registry_lists_both_entries_and_names_the_choices() -> None:
    assert {"digits", "vision"} <= set(zoo_names())
    with pytest.raises(KeyError, match="digits"):
        get_pair("nope")


@pytest.mark.parametrize("name", zoo_names())
def test_pairs_share_boundaries_and_the_student_is_much_smaller(name: str) -> None:
    pair = get_pair(name)
    assert pair.teacher.boundary_shapes == pair.student.boundary_shapes
    assert pair.num_blocks >= (3 if name == "digits" else 4)
    assert pair.boundary_shapes[-1] == (pair.num_classes,)  # the last boundary is logits
    # KnowledgeNet's figure: the student has at least 62 % fewer parameters.
    assert pair.student.params() <= 0.38 * pair.teacher.params()
    assert pair.size_reduction >= 0.62
    assert all(pair.student.params(i) <= pair.teacher.params(i)
               for i in range(1, pair.num_blocks + 1))


def test_digits_and_vision_shapes() -> None:
    d, v = get_pair("digits"), get_pair("vision")
    assert d.boundary_shapes[0] == (1, 8, 8) and d.num_classes == 10
    assert 100_000 <= d.teacher.params() <= 300_000
    assert v.boundary_shapes[0] == (3, 96, 96) and v.num_classes == VISION_CLASSES


@pytest.mark.parametrize("name", zoo_names())
def test_same_seed_same_weights_and_outputs_other_seed_other_weights(name: str) -> None:
    a, b, c = get_pair(name, 3), get_pair(name, 3), get_pair(name, 4)
    for role in ("teacher", "student"):
        ma, mb = getattr(a, role).eval(), getattr(b, role).eval()
        for x, y in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True):
            assert torch.equal(x, y)
        inp = torch.randn(2, *ma.input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(ma(inp), mb(inp))
    w = next(iter(a.student.parameters()))
    if zoo_entry(name).pretrained:  # teacher from its weights, student derived from it
        assert torch.equal(w, next(iter(c.student.parameters())))
    else:
        assert not torch.equal(w, next(iter(c.student.parameters())))


def test_training_is_deterministic_for_a_seed_and_restores_torch_settings() -> None:
    from cloud_trainer.training.train import train_supervised

    s = digits_splits()
    threads = torch.get_num_threads()
    runs = []
    for _ in range(2):
        model = get_pair("digits", seed=1).student
        train_supervised(model, s.x_train[:256], s.y_train[:256], epochs=2, lr=3e-3, seed=5,
                         batch_size=32, shift=1)
        assert not model.training
        runs.append(model.state_dict())
    for x, y in zip(runs[0].values(), runs[1].values(), strict=True):
        assert torch.equal(x, y)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_digits_split_is_real_stratified_and_fixed() -> None:
    s = digits_splits()
    assert s.x_train.shape[1:] == (1, 8, 8) and s.x_train.dtype == np.float32
    assert len(s.x_train) + len(s.x_test) == 1797
    assert abs(len(s.x_test) / 1797 - 0.3) < 0.01
    assert s.x_test.min() >= 0.0 and s.x_test.max() <= 1.0
    assert set(np.unique(s.y_test)) == set(range(10))
    assert digits_splits() is s
    other = digits_splits(1)
    assert not np.array_equal(other.y_test, s.y_test)


def test_vision_frames_come_from_the_bundled_photos() -> None:
    x, y = vision_frames(64, seed=1)
    assert x.shape == (64, 3, 96, 96) and x.dtype == np.float32
    assert set(y) <= set(range(VISION_CLASSES)) and len(set(y)) >= 6
    x2, y2 = vision_frames(64, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(vision_frames(4, seed=2)[0], x[:4])
    assert x.std() > 0.3  # real pictures, not constant frames
    assert np.isfinite(x).all()


@pytest.mark.slow
def test_trained_digits_pair_reaches_high_accuracy_and_is_cached(tmp_path) -> None:
    from cloud_trainer.training.train import cache_path, evaluate, trained_pair

    pair = trained_pair("digits", seed=0, cache_dir=tmp_path)
    s = digits_splits()
    assert evaluate(pair.teacher, s.x_test, s.y_test) >= 0.97
    assert evaluate(pair.student, s.x_test, s.y_test) >= 0.95
    assert pair.metrics["teacher_accuracy"] == evaluate(pair.teacher, s.x_test, s.y_test)
    assert cache_path("digits", 0, tmp_path).is_file()
    t0 = time.perf_counter()
    again = trained_pair("digits", seed=0, cache_dir=tmp_path)  # from the cache
    assert time.perf_counter() - t0 < 2.0
    assert not again.student.training and not again.teacher.training
    for x, y in zip(again.student.state_dict().values(), pair.student.state_dict().values(),
                    strict=True):
        assert torch.equal(x, y)
    assert again.metrics == pair.metrics
