"""The whole loop with a real agent: a device runs a damaged student and uplinks raw inputs;
the trainer ingests them, retrains label-free, gates, signs and pushes to the device as its
canary; the agent's updater verifies, self-tests and swaps, reports ``applied`` on its
``update`` topic, and only then does the trainer publish to the whole fleet."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_helpers import write_inputs
from mqtt_helpers import wait_until
from trainer_helpers import deploy_damaged_digits, job, trainer_toml
from update_helpers import agent_toml, running_agent

from broker.launcher import Mosquitto
from cloud_trainer.release.registry import Registry
from cloud_trainer.service import TrainerService
from cloud_trainer.trainer_config import load_trainer_config

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_agent_applies_the_retrained_update_as_canary_then_the_fleet_gets_it(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    deploy_damaged_digits(tmp_path)
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
    v2 = Registry(tmp_path / "state" / "registry").get("digits", 2)
    assert v2.status == "pushed" and v2.scores["gate"]["delta"] > 0
    rollout = v2.scores["rollout"]
    assert rollout["canary"] == ["cam-1"] and rollout["succeeded"] == ["cam-1"]
    assert rollout["stages"] == ["canary", "all"]
