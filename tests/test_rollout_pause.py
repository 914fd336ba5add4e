"""The operator's rollout pause (cloud_trainer/release/rollout.py ``RolloutPause``): a staged
rollout publishes no stage while it is set, goes on when it is cleared, and a trainer stopping
meanwhile interrupts the run (resumed later) instead of publishing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from cloud_trainer.ingest.fleet import FleetTable
from cloud_trainer.release.rollout import RolloutInterrupted, RolloutPause, staged_rollout
from cloud_trainer.release.runs import RunLog
from cloud_trainer.trainer_config import JobSection, RolloutSection


def _rollout(tmp: Path, pause: RolloutPause, stop: threading.Event,
             published: list[str], errors: list[BaseException]) -> threading.Thread:
    def go() -> None:
        try:
            staged_rollout(RolloutSection(enabled=False),
                           JobSection(id="j", model="digits", interval_s=60), FleetTable(),
                           RunLog(tmp / "reg"), "digits", 2,
                           lambda _t, stage: published.append(stage), lambda: None,
                           stop.is_set, pause=pause)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_a_paused_rollout_publishes_only_after_the_resume(tmp_path: Path) -> None:
    pause = RolloutPause(tmp_path / "rollout.paused")
    pause.set("alice")
    assert RolloutPause(tmp_path / "rollout.paused").info()["by"] == "alice"  # persisted
    published: list[str] = []
    errors: list[BaseException] = []
    t = _rollout(tmp_path, pause, threading.Event(), published, errors)
    assert pause.holding.wait(10), "the rollout did not reach the pause"
    assert published == []
    pause.clear("alice")
    t.join(10)
    assert not t.is_alive() and not errors and published == ["all"]


def test_stopping_while_paused_interrupts_the_run(tmp_path: Path) -> None:
    pause = RolloutPause(tmp_path / "rollout.paused")
    pause.set("bob")
    stop = threading.Event()
    published: list[str] = []
    errors: list[Any] = []
    t = _rollout(tmp_path, pause, stop, published, errors)
    assert pause.holding.wait(10)
    stop.set()
    t.join(10)
    assert not t.is_alive() and published == []
    assert len(errors) == 1 and isinstance(errors[0], RolloutInterrupted)


def test_not_paused_is_no_wait(tmp_path: Path) -> None:
    pause = RolloutPause(tmp_path / "rollout.paused")
    assert pause.info() is None and not pause.is_set()
    published: list[str] = []
    errors: list[BaseException] = []
    _rollout(tmp_path, pause, threading.Event(), published, errors).join(10)
    assert published == ["all"] and not errors
    with pytest.raises(FileNotFoundError):
        (tmp_path / "rollout.paused").read_text()
