"""The whole loop with a real agent: a device runs a damaged student and uplinks raw inputs;
the trainer ingests them, retrains label-free, gates, signs and pushes to the device as its
canary; the agent's updater verifies, self-tests and swaps, reports ``applied`` on its
``update`` topic, and only then does the trainer publish to the whole fleet."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from agent_helpers import write_inputs
from mqtt_helpers import wait_until
from trainer_helpers import degraded_student, job, register_deployed, trainer_toml
from update_helpers import agent_toml, running_agent

from agent.profiles import load_profile
from broker.launcher import Mosquitto
from cloud_trainer.data import digits_splits
from cloud_trainer.distill import train_student_blockwise_from_inputs
from cloud_trainer.export import target_for_ort
from cloud_trainer.registry import Registry
from cloud_trainer.retrain import ExportCache
from cloud_trainer.service import TrainerService
from cloud_trainer.train import trained_pair
from cloud_trainer.trainer_config import load_trainer_config
from cloud_trainer.zoo import get_pair

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_agent_applies_the_retrained_update_as_canary_then_the_fleet_gets_it(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    pair = trained_pair("digits")
    kt = train_student_blockwise_from_inputs(pair.teacher, get_pair("digits", 0).student,
                                             digits_splits().x_train,
                                             inputs="student+boundary", epochs=10).student
    deployed = degraded_student(kt, block=3, scale=6.0)
    state = tmp_path / "state"
    register_deployed(state, deployed)
    ort = load_profile("x86-dev").onnxruntime
    _part, src = ExportCache(state / "exports").partition(deployed, "digits", 1,
                                                          target_for_ort(ort), ort)
    shutil.copytree(src, tmp_path / "model")
    config = load_trainer_config(trainer_toml(
        tmp_path, mosquitto.port, ingest={"enabled": True},
        jobs=[job("r", min_new_samples=300, boundaries=[0], training={"epochs": 8})],
        rollout={"canary_fraction": 1.0, "success_timeout_s": 60}))
    write_inputs(tmp_path / "inputs.npz", 540)
    agent_cfg = agent_toml(
        tmp_path, mosquitto.port, tmp_path / "model" / "manifest.json",
        tmp_path / "keys" / "knet-update.pub", device="cam-1",
        uplink={"boundaries": [0], "allow_raw_upload": True, "codec": "uint8+lz4"},
        update={"agreement_threshold": 0.2})
    with TrainerService(config) as svc, running_agent(agent_cfg) as agent:
        assert wait_until(lambda: svc.store.count(boundary=0, model_version=1) >= 600, 60)
        assert wait_until(lambda: "cam-1" in svc.fleet.online(), 10)
        run = svc.run_job("r")
        assert run.status == "pushed", run
        assert agent.slot.current.version == 2
        assert wait_until(lambda: svc.fleet.get("cam-1").model_version == 2, 20)
    v2 = Registry(state / "registry").get("digits", 2)
    assert v2.status == "pushed" and v2.scores["gate"]["delta"] > 0
    rollout = v2.scores["rollout"]
    assert rollout["canary"] == ["cam-1"] and rollout["succeeded"] == ["cam-1"]
    assert rollout["stages"] == ["canary", "all"]
