"""`knet bench distill --model effnet-lite0` end to end on a handful of frames."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_trainer.training import train

pytestmark = [pytest.mark.slow]


@pytest.fixture
def tiny_scenes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two frames per scene of four training photos (two held out): seconds, not minutes."""
    tiny = {"train": (2, train.IN_SCENE[:4], 1000), "in-scene": (2, train.IN_SCENE[:4], 5000),
            "out-of-scene": (2, train.OUT_OF_SCENE[:2], 7000)}
    monkeypatch.setattr(train, "SCENE_SPLITS", tiny)
    train.scene_set.cache_clear()
    yield
    train.scene_set.cache_clear()


@pytest.mark.usefixtures("tiny_scenes")
def test_the_scene_bench_scores_every_row_on_both_held_out_sets(tmp_path: Path) -> None:
    from bench.distill_scenes import ROWS, run_scene_distill_bench

    result = run_scene_distill_bench(seeds=(0, 1), steps=1, json_path=tmp_path / "d.json",
                                     plot_path=tmp_path / "d.png",
                                     rows=(ROWS[2], ROWS[3], ROWS[6]))
    by = {r["row"]: r for r in result["rows"]}
    assert list(by) == [ROWS[0], ROWS[1], ROWS[2], ROWS[3], ROWS[6]]
    assert by[ROWS[0]]["in-scene top1"] == 100.0  # the teacher agrees with itself
    assert by[ROWS[6]]["seeds"] == 1 and by[ROWS[3]]["seeds"] == 2  # scratch: first seed
    for r in result["rows"]:
        for m in ("in-scene top1", "in-scene top5", "out-of-scene top1", "out-of-scene top5"):
            assert 0.0 <= r[m] <= 100.0
        assert r["in-scene top5"] >= r["in-scene top1"]
        assert 0.0 <= r["in-scene top1 sure"] <= 100.0
        assert len(r["in-scene swap"]) == 5 and all(0.0 <= a <= 100.0 for a in r["in-scene swap"])
    # blocks 1-2 of the derived student are the teacher's own: swapping them changes nothing
    assert by[ROWS[1]]["in-scene swap"][:2] == [100.0, 100.0]
    assert len(result["paired_vs_logit_kd"][ROWS[3]]["per_seed"]) == 2
    assert result["size_reduction"] >= 0.62 and result["goals"]["student_at_least_62pct_smaller"]
    assert json.loads((tmp_path / "d.json").read_text())["results"]["train_frames"] == 8
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.usefixtures("tiny_scenes")
def test_the_headroom_probe_trains_one_block_alone_at_two_widths(tmp_path: Path) -> None:
    from bench.distill_headroom import run_headroom

    result = run_headroom(block=4, steps=2, json_path=tmp_path / "h.json")
    with pytest.raises(ValueError, match="1-4"):
        run_headroom(block=5, steps=1)
    student, full = result["variants"].values()
    assert full["params"] > student["params"]  # the repeats dropped, nothing narrowed
    for v in (student, full):
        assert [p["step"] for p in v["curve"]] == [0, 1, 2]
        assert all(0.0 <= p["in-scene"] <= 100.0 for p in v["curve"])
    assert json.loads((tmp_path / "h.json").read_text())["results"]["block"] == 4
