"""A retraining job in ``synthetic-gradients`` mode over a real Mosquitto: trained from operator
labels on two torchrun workers, gated, exported, signed and pushed like any run; and a worker
killed with SIGKILL mid-run fails the run by name and leaves the registry as it was."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from mqtt_helpers import Collector, wait_until
from trainer_helpers import (
    FLEET,
    boundary_envelopes,
    degraded_student,
    job,
    register_deployed,
    store_samples,
    trainer_toml,
)

from agent.update.update_manifest import parse_signed
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.models.data import digits_splits
from cloud_trainer.release.registry import Registry
from cloud_trainer.release.runs import Run
from cloud_trainer.service import TrainerService
from cloud_trainer.trainer_config import load_trainer_config
from cloud_trainer.training.train import trained_pair

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
TOPICS = Topics(FLEET)


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """A damaged deployed student and every training image uplinked raw, with its label."""
    deployed = degraded_student(trained_pair("digits").student, block=3, scale=6.0)
    register_deployed(tmp_path / "state", deployed)
    s = digits_splits()
    envelopes = [dataclasses.replace(e, label=int(y)) for e, y in
                 zip(boundary_envelopes(deployed, s.x_train, 0), s.y_train, strict=True)]
    store_samples(tmp_path / "state", envelopes)
    return tmp_path


def sg_job(epochs: int, **training: int) -> dict:
    return job("sg", boundaries=[0], training={"mode": "synthetic-gradients", "workers": 2,
                                               "epochs": epochs, "batch_size": 64, **training},
               gate={"metric": "accuracy"})  # the held-out samples are labelled too


def test_synthetic_gradient_job_trains_gates_and_pushes_a_signed_update(
        labelled: Path, mosquitto: Mosquitto) -> None:
    tmp = labelled
    job_ = sg_job(3, m_replay=8, m_replay_steps=1)
    config = load_trainer_config(trainer_toml(tmp, mosquitto.port, jobs=[job_]))
    with Collector(mosquitto.host, mosquitto.port, TOPICS.manifest) as manifests, \
            TrainerService(config, oneshot=True) as svc:
        run = svc.run_job("sg")
        assert run.status == "pushed", run
        assert manifests.wait_for(lambda m: bool(m), 10)
        payload = manifests.payloads()[0]
    v2 = Registry(tmp / "state" / "registry").get("digits", 2)
    assert v2.status == "pushed" and v2.info["run_id"] == run.run_id
    info = v2.info
    assert info["mode"] == "synthetic-gradients" and info["workers"] == 2
    assert len(info["partition"]) == 2 and info["synthetic_boundaries"]
    assert (info["m_replay"], info["m_replay_steps"]) == (8, 1)  # the job's setting ran
    assert info["labelled"] > 0 and info["unlabelled"] == 0 and info["trained"] == [1, 2, 3, 4]
    gate = v2.scores["gate"]
    assert gate["metric"] == "accuracy" and gate["passed"] and gate["delta"] > 0
    key = serialization.load_pem_public_key((tmp / "keys" / "knet-update.pub").read_bytes())
    assert parse_signed(payload, [key], fleet=FLEET).version == 2


def test_a_sigkilled_worker_fails_the_run_and_leaves_the_registry_unchanged(
        labelled: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = labelled
    work = tmp / "work"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # where the run's job dir goes
    config = load_trainer_config(trainer_toml(tmp, mosquitto.port, jobs=[sg_job(5000)]))
    registry = Registry(tmp / "state" / "registry")
    before = [(v.version, v.status) for v in registry.versions("digits")]
    out: dict[str, Run] = {}

    def progressed() -> bool:
        for d in work.glob("knet-disagg-*"):
            try:
                step = json.loads((d / "progress.json").read_text())["step"]
            except (OSError, ValueError):
                return False
            return step >= 2 and (d / "rank-1.pid").is_file()
        return False

    with TrainerService(config, oneshot=True) as svc:
        runner = threading.Thread(target=lambda: out.update(run=svc.run_job("sg")))
        runner.start()
        assert wait_until(progressed, 240), "the workers never got going"
        (job_dir,) = work.glob("knet-disagg-*")
        os.kill(int((job_dir / "rank-1.pid").read_text()), signal.SIGKILL)
        runner.join(120)
        assert not runner.is_alive()
    run = out["run"]
    assert run.status == "failed", run
    # which blocks rank 1 holds follows the step costs measured at the start (load-dependent)
    assert re.match(r"WorkerFailed: worker rank 1 \(blocks? \d(-\d)?\) was killed by SIGKILL",
                    run.reason), run.reason
    assert [(v.version, v.status) for v in registry.versions("digits")] == before
    assert not (tmp / "state" / "manifests" / "digits" / "current.json").exists()
    assert not job_dir.exists()  # the run's files are cleaned up
    assert run.version is None  # no candidate was ever registered
