"""cloud_trainer/scheduler.py: each scheduler runs its jobs against the runner it was given
(no process-wide service), the stored job never holds that runner, and a failing run is
recorded in the run log."""

from __future__ import annotations

import threading
from pathlib import Path

from mqtt_helpers import eventually
from trainer_helpers import job, trainer_toml

from cloud_trainer.release.runs import RunLog
from cloud_trainer.scheduler import JobScheduler
from cloud_trainer.trainer_config import load_trainer_config


class Runner:
    """Records the runs it is asked for; raises for the job ids in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail
        self.ran = threading.Event()

    def run_job(self, job_id: str, trigger: str = "manual") -> object:
        self.calls.append((job_id, trigger))
        self.ran.set()
        if job_id in self.fail:
            raise RuntimeError(f"{job_id} broke")
        return None


def scheduler(tmp: Path, name: str, runner: Runner) -> tuple[JobScheduler, RunLog]:
    config = load_trainer_config(trainer_toml(tmp / name, 1883, jobs=[job(name)]))
    config.trainer.state_dir.mkdir(parents=True)
    runs = RunLog(config.registry_dir)
    return JobScheduler(config, runs, runner), runs


def test_two_schedulers_in_one_process_each_run_their_own_service(tmp_path: Path) -> None:
    one, two = Runner(), Runner()
    s1, _ = scheduler(tmp_path, "one", one)
    s2, _ = scheduler(tmp_path, "two", two)
    s1.start()
    s2.start()
    try:
        s2.run_now("two")
        assert two.ran.wait(30)
        s1.run_now("one")
        assert one.ran.wait(30)
        assert one.calls == [("one", "schedule")] and two.calls == [("two", "schedule")]
        stored = s1.get_job("one")
        assert stored is not None and stored.kwargs == {}  # the runner is never stored
        assert s1.get_job("two") is None
    finally:
        s1.stop()
        s2.stop()
        s2.stop()  # idempotent


def test_a_failing_run_is_recorded_as_failed(tmp_path: Path) -> None:
    runner = Runner(fail=("bad",))
    sched, runs = scheduler(tmp_path, "bad", runner)
    sched.start()
    try:
        sched.run_now("bad")
        assert runner.ran.wait(30)
        # the listener writes the event after the run returns
        eventually(lambda: runs.runs("bad", kind="event"), 30, "the failed run's event",
                   interval=0.05)
    finally:
        sched.stop()
    events = runs.runs("bad", kind="event")
    assert [(e.status, e.reason) for e in events] == [
        ("failed", "job raised RuntimeError('bad broke')")]


def test_job_stores_written_before_this_module_still_resolve_their_function() -> None:
    """Older job stores reference ``cloud_trainer.service:scheduled_run``."""
    from apscheduler.util import ref_to_obj

    from cloud_trainer import scheduler

    assert ref_to_obj("cloud_trainer.service:scheduled_run") is scheduler.scheduled_run
