"""`knet-trainer --config` as a real process: retained online/offline state, the persisted job
store across a restart, one scheduler per job store, `jobs list/run-now`, and SIGKILL in the
middle of a run followed by a consistent registry and a run that proceeds."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mqtt_helpers import Collector, eventually, wait_until
from test_split import request as split_request
from trainer_helpers import (
    FLEET,
    boundary_envelopes,
    degraded_student,
    job,
    register_deployed,
    start_trainer,
    store_samples,
    trainer_cli,
    trainer_toml,
)

from agent.wire.codec import encode
from agent.wire.envelope import Envelope
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.models.data import digits_splits
from cloud_trainer.release.registry import Registry
from cloud_trainer.release.runs import TERMINAL, RunLog
from cloud_trainer.training.train import trained_pair

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
TOPICS = Topics(FLEET)
STATE = TOPICS.trainer_state("trainer-t")


def runs_of(tmp: Path, job_id: str) -> list:  # type: ignore[type-arg]
    """The job's runs, read from the daemon's registry. Not cheap (an engine, its schema
    check): poll it at most a few times a second, or wait on the trainer state instead."""
    path = tmp / "state" / "registry" / "registry.sqlite3"
    if not path.exists():
        return []
    log = RunLog(path.parent)
    try:
        return log.runs(job_id, kind="run")
    finally:
        log.engine.dispose()


def expect_run(states: Collector, job_id: str, pred: Any, timeout: float,
               what: str) -> dict[str, Any]:
    """Wait for a trainer state message whose latest run of ``job_id`` satisfies ``pred``
    (the daemon publishes its state after every run); returns that run's summary."""
    def latest(m: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
        return [json.loads(p).get("runs", {}).get(job_id) for t, p, _r in m
                if t == STATE and p]

    got = states.expect(lambda m: any(r and pred(r) for r in latest(m)), timeout, what)
    return next(r for r in reversed(latest(got)) if r and pred(r))


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> str:
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"the daemon did not stop within {timeout:g} s of signal {sig}; "
                             f"its log:\n{out[-4000:]}") from None
    return out


def last_state(c: Collector) -> dict:  # type: ignore[type-arg]
    return json.loads(c.payloads(STATE)[-1])


def test_daemon_schedules_persists_and_refuses_a_second_scheduler(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = trainer_toml(tmp_path, mosquitto.port, ingest={"enabled": True},
                          split={"enabled": True}, jobs=[
        job("tick", interval_s=1.5, min_new_samples=10**6),
        job("later", interval_s=3600, min_new_samples=10**6),
    ])
    with Collector(mosquitto.host, mosquitto.port, STATE) as states:
        daemon = start_trainer(config)
        try:
            # An event, not a poll of the registry: 100 polls a second, each opening an
            # engine, took a core from the daemon starting up on a loaded machine ("no run").
            first = expect_run(states, "tick", lambda r: r["status"] in TERMINAL, 90,
                               "a finished scheduled run of job tick")
            assert first["status"] == "skipped", first
            assert wait_until(lambda: bool(states.payloads()) and
                              last_state(states)["state"] == "online", 10)
            assert last_state(states)["models"]["digits"]["deployed"] == 1
            assert wait_until(lambda: "ingest" in last_state(states), 15)
            assert last_state(states)["ingest"]["bad_total"] == 0
            tick = next(r for r in runs_of(tmp_path, "tick") if r.finished)
            assert tick.trigger == "schedule" and tick.status == "skipped"

            # [split] enabled: the daemon finishes a device's boundary-2 activation
            teacher = trained_pair("digits").teacher
            x = torch.from_numpy(np.array(digits_splits().x_test[:1]))
            with torch.no_grad():
                a2 = teacher.run(x, 1, 2)
                want = int(teacher.run(a2, 3).argmax(1))
            env = Envelope(device="dev-1", session=1, seq=1, timestamp=time.time(),
                           model_version=1, boundary=2, payload=encode(a2.numpy(), "raw"),
                           meta={"model": "digits"})
            assert split_request(mosquitto.port, env.pack(), TOPICS.infer("dev-1")) \
                ["prediction"] == want

            second = start_trainer(config)
            out, _ = second.communicate(timeout=60)
            assert second.returncode == 2, out
            assert "scheduler.lock is held by pid" in out and str(daemon.pid) in out

            listed = json.loads(trainer_cli(config, "jobs", "list", "--json").stdout)
            by_id = {r["id"]: r for r in listed}
            assert by_id["tick"]["stored"] and by_id["later"]["stored"]
            later_next = by_id["later"]["next_run"]
            # tick runs every 1.5 s: the list may catch its next run in flight ("running");
            # every run of it that finished was skipped (nothing new to train on).
            assert later_next is not None
            assert by_id["tick"]["last_status"] in ("skipped", "running"), by_id["tick"]
            assert {r.status for r in runs_of(tmp_path, "tick") if r.finished} == {"skipped"}

            assert not runs_of(tmp_path, "later")
            done = trainer_cli(config, "jobs", "run-now", "later", "--timeout", "60")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "asked the trainer daemon" in done.stdout and "skipped" in done.stdout
            assert len(runs_of(tmp_path, "later")) == 1
            listed = json.loads(trainer_cli(config, "jobs", "list", "--json").stdout)
            later_next = {r["id"]: r for r in listed}["later"]["next_run"]  # run-now moved it
        finally:
            out = stop(daemon)
        assert daemon.returncode == 0, out[-3000:]
        assert wait_until(lambda: last_state(states)["state"] == "offline", 10)
        for line in out.splitlines():  # structured logs: one JSON object per line
            if line.startswith("{"):
                assert {"time", "level", "logger", "message"} <= json.loads(line).keys()

        restarted = time.time()
        daemon = start_trainer(config)
        try:
            expect_run(states, "tick", lambda r: datetime.fromisoformat(
                r["started_at"]).timestamp() > restarted, 90,
                "a run of job tick after the restart")
            listed = json.loads(trainer_cli(config, "jobs", "list", "--json").stdout)
            # the stored job kept its place in time: not rescheduled an hour from the restart
            assert {r["id"]: r for r in listed}["later"]["next_run"] == later_next
        finally:
            out = stop(daemon)
        assert daemon.returncode == 0, out[-3000:]


def daemon_in_training(tmp_path: Path, mosquitto: Mosquitto,
                       epochs: int) -> tuple[Path, subprocess.Popen[str]]:
    """A daemon whose job ``r`` has reached its training step on a degraded digits student."""
    pair = trained_pair("digits")
    deployed = degraded_student(pair.student, block=3, scale=1.0)
    register_deployed(tmp_path / "state", deployed)
    store_samples(tmp_path / "state", boundary_envelopes(deployed, digits_splits().x_train, 0))
    # jetson-nano: onnxruntime 1.16 takes the TorchScript exporter, seconds faster per block
    config = trainer_toml(tmp_path, mosquitto.port, ingest={"enabled": False},
                          models__digits={"profiles": ["jetson-nano"]}, jobs=[
        job("r", interval_s=1, min_new_samples=100, boundaries=[0],
            training={"epochs": epochs}, gate={"margin": 100.0}),
    ])
    daemon = start_trainer(config)
    try:
        eventually(lambda: any(r.step == "train" for r in runs_of(tmp_path, "r")), 90,
                   "job r's run to reach its training step", interval=0.25)
    except BaseException:
        daemon.kill()
        daemon.communicate(timeout=30)
        raise
    return config, daemon


def test_sigkill_mid_run_leaves_a_consistent_registry_and_the_next_run_proceeds(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    config, daemon = daemon_in_training(tmp_path, mosquitto, epochs=12)
    daemon.kill()  # inside the training step
    daemon.communicate(timeout=30)
    interrupted = runs_of(tmp_path, "r")
    assert [r.status for r in interrupted] == ["running"]
    registry = Registry(tmp_path / "state" / "registry")
    assert [v.status for v in registry.versions("digits")] == ["pushed"]  # no half version

    resumed = trainer_cli(config, "jobs", "run-now", "r", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    run = runs_of(tmp_path, "r")[0]
    assert run.run_id == interrupted[0].run_id and run.attempts == 2, run
    assert run.status == "pushed" and run.version == 2
    versions = registry.versions("digits")
    assert [v.status for v in versions] == ["superseded", "pushed"]
    assert versions[1].info["run_id"] == run.run_id
    assert (tmp_path / "state" / "manifests" / "digits" / "current.json").is_file()

    nxt = trainer_cli(config, "jobs", "run-now", "r", timeout=300)
    assert nxt.returncode == 0, nxt.stdout + nxt.stderr
    latest = runs_of(tmp_path, "r")[0]
    assert latest.run_id != run.run_id and latest.status == "skipped"  # window consumed
    assert latest.deployed_version == 2


def test_sigterm_mid_training_stops_within_the_labs_timeout_and_the_run_resumes(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A retraining run that would take minutes does not hold a SIGTERM up: training polls
    the stop flag between optimiser steps, the daemon says offline and exits 0 well within
    the 20 s that `knet demo` (and systemd's default 90 s) give it, and the run stays open
    to be resumed — no half version in the registry."""
    _config, daemon = daemon_in_training(tmp_path, mosquitto, epochs=500)
    try:
        t0 = time.monotonic()
        out = stop(daemon, timeout=20)  # fails with the daemon's log if it does not stop
        took = time.monotonic() - t0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate(timeout=30)
    assert daemon.returncode == 0, out
    assert "interrupted while training" in out, out
    assert took < 20
    assert [r.status for r in runs_of(tmp_path, "r")] == ["running"]
    registry = Registry(tmp_path / "state" / "registry")
    assert [v.status for v in registry.versions("digits")] == ["pushed"]


def test_a_run_missed_while_the_trainer_was_down_is_recorded(tmp_path: Path,
                                                             mosquitto: Mosquitto) -> None:
    from datetime import UTC, datetime, timedelta

    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    from cloud_trainer.service import TrainerService, list_jobs
    from cloud_trainer.trainer_config import load_trainer_config

    config = load_trainer_config(trainer_toml(
        tmp_path, mosquitto.port, ingest={"enabled": False},
        jobs=[job("nightly", interval_s=3600, misfire_grace_s=60)]))
    with TrainerService(config):
        pass
    # an outage: the stored next run time is ten minutes past when the trainer comes back
    # (edited in the store itself: a scheduler's shutdown processes due jobs once more)
    store = SQLAlchemyJobStore(url=f"sqlite:///{config.jobs_db}")
    store.start(BackgroundScheduler(timezone=UTC), "default")
    stored = store.lookup_job("nightly")
    stored._modify(next_run_time=datetime.now(UTC) - timedelta(minutes=10))
    store.update_job(stored)
    store.shutdown()
    with TrainerService(config) as svc:
        assert wait_until(lambda: any(r.status == "missed" for r in svc.runs.runs("nightly")),
                          20)
        assert not svc.runs.runs("nightly", kind="run")  # missed means not run
    event = RunLog(config.registry_dir).runs("nightly", kind="event")[0]
    assert "missed its grace time" in event.reason
    assert list_jobs(config)[0]["missed"] == 1
