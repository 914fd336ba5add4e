"""Moving the device↔cloud cut with the link: signed slice assignments, and a shaped uplink
that makes the trainer move a live agent's cut toward the device and back, no restart."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from agent_helpers import agent_config, write_inputs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_helpers import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from update_helpers import CHUNK, FLEET, running_agent, write_public_key

from agent.infer.blockbench import BenchRecord, measure
from agent.infer.manifest import PartitionManifest
from agent.infer.profiles import load_profile
from agent.infer.runtime import BlockRunner
from agent.mqtt.endpoint import MqttEndpoint
from agent.update.active import BootChoice, boot_runner, update_paths
from agent.update.update_manifest import (
    UpdateRejected,
    canonical_json,
    parse_signed,
    validate_manifest,
)
from agent.wire.topics import Topics
from broker.launcher import Mosquitto
from cloud_trainer.models.export import export_partition
from cloud_trainer.models.zoo import get_pair
from cloud_trainer.plan.adapt import LinkFigures, Replanner
from cloud_trainer.plan.adaptive import CutAdapter
from cloud_trainer.plan.network import NetworkConfig
from cloud_trainer.release.keys import sign_manifest
from cloud_trainer.release.publisher import BlobPublisher, make_update
from cloud_trainer.serve.split import SplitServer

T = Topics(FLEET)


def endpoint(broker: Mosquitto) -> MqttEndpoint:
    return MqttEndpoint(host=broker.host, port=broker.port)
ALL_ON_DEVICE_S = 0.65  # the device's time for all blocks the planner is given
SLOW, FAST = 2_000.0, 80_000.0  # bytes/s: the shaped uplink, about what is offered


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PartitionManifest,
                                                              BenchRecord]:
    root = tmp_path_factory.mktemp("cut")
    full = export_partition(get_pair("digits", seed=0).student, root / "full",
                            model_id="digits", model_version=1, ort_version="1.16.3")
    runner = BlockRunner(full, root / "full", load_profile("x86-dev"))
    x = np.random.default_rng(0).random((6, *runner.input_shape), dtype=np.float32)
    rec = measure(runner, x, device="dev-1", codecs=("raw",), warmup=1, repeats=5)
    return root, full, rec


def network(rec: BenchRecord) -> NetworkConfig:
    """A camera whose blocks take ``ALL_ON_DEVICE_S`` in all, a cloud at this machine's
    speed: offloading after block 1 wins on a fast link, keeping the blocks on a slow one."""
    scale = ALL_ON_DEVICE_S / sum(b.median_s for b in rec.blocks)
    return NetworkConfig.model_validate({
        "mqtt_overhead_bytes": 200,
        "nodes": [{"name": "cam", "profile": "rpi4", "device": "dev-1", "time_scale": scale},
                  {"name": "cloud", "profile": "x86-dev", "device": "dev-1"}],
        "links": [{"from": "cam", "to": "cloud", "bandwidth_mbps": 1000, "rtt_ms": 1}],
        "constraints": {"min_device_blocks": 1, "codecs": ["raw"]},
    })


def _provision_device(tmp_path: Path, root: Path, part: PartitionManifest, *, inputs: int
                      ) -> tuple[Path, Ed25519PrivateKey, Path]:
    """A device model directory holding ``part`` of v1, an operator key (and its public
    file) and ``inputs`` digits in inputs.npz."""
    dev_model = tmp_path / "dev-model"
    shutil.copytree(root / "full", dev_model)
    part.dump(dev_model / "manifest.json")
    key = Ed25519PrivateKey.generate()
    pub = write_public_key(key, tmp_path / "operator.pub")
    write_inputs(tmp_path / "inputs.npz", inputs)
    return dev_model, key, pub


def _mbps(bytes_per_s: float) -> float:
    return bytes_per_s * 8 / 1e6


def test_assignments_are_validated_bounded_and_signed(model: Any) -> None:
    root, full, _rec = model
    key = Ed25519PrivateKey.generate()
    base, _files = make_update(FLEET, "digits", 1, {"": (full, root / "full")},
                               chunk_size=CHUNK)
    doc = base.model_dump(mode="json")
    for bad, why in (({"dev-1": {"first": 1, "last": 5}}, "4-block model"),
                     ({"dev-1": {"first": 3, "last": 2}}, "last 2 < first 3"),
                     ({"dev/1": {"first": 1, "last": 2}}, "assignments"),
                     ({"dev-1": {"first": 1, "last": 2, "x": 1}}, "(?i)extra")):
        with pytest.raises(UpdateRejected, match=why) as exc:
            validate_manifest({**doc, "assignments": bad})
        assert exc.value.reason == "malformed"
    many = {f"d{i}": {"first": 1, "last": 1} for i in range(10_001)}
    with pytest.raises(UpdateRejected) as exc:
        validate_manifest({**doc, "assignments": many})
    assert exc.value.reason == "too_large"
    moved = validate_manifest({**doc, "assignments": {"dev-1": {"first": 1, "last": 3}}})
    signed = sign_manifest(moved, key)
    pub = {signed.key_id: key.public_key()}
    assert parse_signed(signed.payload(), pub).assignments["dev-1"].last == 3
    forged = signed.payload().replace(b'"last":3', b'"last":4')
    assert forged != signed.payload()
    with pytest.raises(UpdateRejected) as exc:  # the assignment is covered by the signature
        parse_signed(forged, pub)
    assert exc.value.reason == "bad_signature"
    assert b"assignments" in canonical_json(moved.model_dump(mode="json"))


@pytest.mark.mqtt
@pytest.mark.slow
def test_shaped_uplink_moves_the_cut_toward_the_device_and_back(
        tmp_path: Path, mosquitto: Mosquitto, model: Any) -> None:
    root, full, rec = model
    net = network(rec)
    probe = Replanner(net, [rec], "digits", margin=0.2, sustain=1)
    assert probe.current.slices[0].last == 1  # precondition of the fixture: offload
    on_slow = probe.observe({0: LinkFigures(_mbps(SLOW), 2.0)})
    assert on_slow.switched and on_slow.plan.slices[0].last > 1
    assert probe.observe({0: LinkFigures(_mbps(FAST), 2.0)}).switched

    # The device is provisioned with block 1 of v1 (the configured partition).
    dev_model, key, pub = _provision_device(tmp_path, root, full.slice(1, 1), inputs=200)
    cfg = agent_config(
        tmp_path, mosquitto.port, dev_model / "manifest.json",
        source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 200, "loop": True},
        uplink={"boundaries": [0], "codec": "raw", "allow_raw_upload": True},
        split={"enabled": True},
        update={"enabled": True, "public_keys": [pub], "request_interval_s": 0.5,
                "first_request_after_s": 0.3, "download_timeout_s": 20,
                "min_canary_inputs": 4},
        **{"update.health": {"watch_s": 0}})

    base, files = make_update(FLEET, "digits", 1, {"": (full, root / "full")},
                              chunk_size=CHUNK)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="knet-adapt-test",
                         protocol=mqtt.MQTTv5)
    adapter = CutAdapter(base, {"dev-1": Replanner(net, [rec], "digits", margin=0.2,
                                                   sustain=3)},
                         sign=lambda m: sign_manifest(m, key),
                         publish=lambda s: publisher.publish_update(s, files, timeout=20))
    connected = threading.Event()
    client.on_connect = lambda c, *_: (adapter.attach(c, T), connected.set())
    publisher = BlobPublisher(client, T, tmp_path / "blobs", push_delay=0.1)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    teacher = get_pair("digits", seed=0).teacher
    try:
        assert connected.wait(10)
        publisher.start()
        adapter.start()
        with SplitServer(teacher, "digits", T, endpoint(mosquitto)) as server, \
                running_agent(cfg) as agent:
            assert server.wait_ready(5)
            session = agent.link.session
            assert wait_until(lambda: agent.split.counts().replies >= 50, 30)
            assert agent.slot.current.manifest.last == 1 and not adapter.decisions

            agent.link.shape(SLOW)  # the uplink slows down
            assert wait_until(lambda: agent.slot.current.manifest.last > 1, 90), \
                (adapter.stats, agent.stats()["network"], list(agent.updater.reports)[-3:])
            device, moved = adapter.decisions[-1]
            last = agent.slot.current.manifest.last
            assert device == "dev-1" and moved.plan.slices[0].last == last
            assert moved.best_value < moved.current_value * 0.8  # beyond the margin
            net_slow = agent.stats()["network"]
            assert net_slow["uplink_bytes_per_s"] < 4 * SLOW
            def applied() -> list[Any]:
                return [r for r in agent.updater.reports if r.status == "applied"]

            assert wait_until(lambda: bool(applied()), 10)  # reported just after the swap
            assert applied()[-1].version == 1 and applied()[-1].from_version == 1
            replies = agent.split.counts().replies
            # still serving on the new cut: blocks 1..last here, the rest in the cloud
            if last < 4:
                assert wait_until(lambda: agent.split.counts().replies > replies + 20, 30)
            else:
                count = agent._infer_counts()[0]
                assert wait_until(lambda: agent._infer_counts()[0] > count + 50, 30)
            store, cache = update_paths(Path(agent.config.device.state_dir))
            state = store.load()
            assert state.current is not None and state.current.assigned
            assert state.current.partition.last == last
            # a restart would start on the assigned slice, not the configured one
            boot: BootChoice = boot_runner(PartitionManifest.load(dev_model / "manifest.json"),
                                           dev_model, agent.profile, store, cache, "dev-1")
            assert boot.runner.manifest.last == last and boot.note is None

            agent.link.shape(0)  # ... and recovers
            assert wait_until(lambda: agent.slot.current.manifest.last == 1, 90), \
                (adapter.stats, agent.stats()["network"], list(agent.updater.reports)[-3:])
            assert adapter.decisions[-1][1].plan.slices[0].last == 1
            replies = agent.split.counts().replies
            assert wait_until(lambda: agent.split.counts().replies > replies + 20, 30)
            assert agent.link.session == session  # the same agent process throughout
        assert adapter.stats["switches"] == 2 and adapter.stats["published"] >= 2
        assert adapter.stats["bad_stats"] == 0
    finally:
        adapter.stop()
        publisher.close()
        client.disconnect()
        client.loop_stop()


def _busy_stats(bytes_per_s: float) -> dict[str, Any]:
    return {"network": {"rtt_ms": 2.0, "uplink_bytes_per_s": bytes_per_s,
                        "acked_in_window": 100}}


def test_adapter_reissues_the_newest_manifest_and_waits_for_a_rollout(model: Any) -> None:
    from agent.update.update_manifest import Targets
    from cloud_trainer.plan.adaptive import NotTargeted

    root, full, rec = model
    key = Ed25519PrivateKey.generate()
    canary, _ = make_update(FLEET, "digits", 1, {"": (full, root / "full")},
                            Targets(devices=["dev-2"]), chunk_size=CHUNK)
    current = {"m": canary}
    sent: list[Any] = []
    adapter = CutAdapter(lambda: current["m"],
                         {"dev-1": Replanner(network(rec), [rec], "digits", sustain=2)},
                         sign=lambda m: sign_manifest(m, key), publish=sent.append)
    assert adapter.observe("dev-9", _busy_stats(SLOW)) is None  # no re-planner: ignored
    assert not adapter.observe("dev-1", _busy_stats(SLOW)).switched  # one reading
    assert adapter.observe("dev-1", _busy_stats(SLOW)).switched
    with pytest.raises(NotTargeted):  # v1 is still at its canary: dev-1 must wait
        adapter.manifest()
    full2 = full.model_copy(update={"model_version": 2})
    shutil.copytree(root / "full", root / "full2", dirs_exist_ok=True)
    full2.dump(root / "full2" / "manifest.json")
    current["m"], _ = make_update(FLEET, "digits", 2, {"": (full2, root / "full2")},
                                  chunk_size=CHUNK)
    adapter.start()
    try:
        assert wait_until(lambda: bool(sent), 10)
    finally:
        adapter.stop()
    m = sent[-1].manifest
    assert m.version == 2 and m.assignments["dev-1"].first == 1
    assert m.assignments["dev-1"].last > 1
    assert parse_signed(sent[-1].payload(), {sent[-1].key_id: key.public_key()}) == m


def test_hostile_stats_are_counted_and_change_nothing(model: Any) -> None:
    _root, full, rec = model
    base, _ = make_update(FLEET, "digits", 1, {"": (full, model[0] / "full")},
                          chunk_size=CHUNK)
    adapter = CutAdapter(base, {"dev-1": Replanner(network(rec), [rec], "digits",
                                                   sustain=1)},
                         sign=lambda m: pytest.fail("nothing to sign"), publish=print)
    adapter.topics = T

    def deliver(topic: str, payload: bytes) -> None:
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = payload
        adapter._on_stats(None, None, msg)

    bad = [b"\xff\xfe", b"[1, 2]", b"{" * 10, b" " * (300 * 1024),
           b'{"network": [1]}', b'{"network": {"acked_in_window": "many"}}',
           b'{"network": {"acked_in_window": 50, "uplink_bytes_per_s": "fast"}}']
    for payload in bad:
        deliver(T.stats("dev-1"), payload)
    deliver("not/a/knet/topic", b"{}")
    assert adapter.stats["bad_stats"] == len(bad) + 1
    # NaN, negative and absurd figures are dropped: the configured (fast) link stays
    for net in ('{"rtt_ms": NaN, "uplink_bytes_per_s": -5, "acked_in_window": 50}',
                '{"rtt_ms": 1e300, "uplink_bytes_per_s": Infinity, "acked_in_window": 50}'):
        deliver(T.stats("dev-1"), f'{{"network": {net}}}'.encode())
    assert adapter.stats["observed"] == 2 and adapter.stats["switches"] == 0


@pytest.mark.mqtt
@pytest.mark.slow
def test_the_trainer_daemon_moves_a_live_agents_cut_with_adapt_enabled(
        tmp_path: Path, mosquitto: Mosquitto, model: Any) -> None:
    from trainer_helpers import register_deployed, trainer_toml

    from cloud_trainer.models.export import target_for_ort
    from cloud_trainer.service import TrainerService
    from cloud_trainer.trainer_config import load_trainer_config
    from cloud_trainer.training.retrain import ExportCache

    _root, _full, rec = model
    student = get_pair("digits", seed=0).student
    state = tmp_path / "state"
    register_deployed(state, student)  # v1, what the device runs
    ort = load_profile("x86-dev").onnxruntime
    part, src = ExportCache(state / "exports").partition(student, "digits", 1,
                                                         target_for_ort(ort), ort)
    shutil.copytree(src, tmp_path / "model")
    part.slice(1, 1).dump(tmp_path / "model" / "manifest.json")  # provisioned: block 1
    rec.dump(tmp_path / "rec.json")
    scale = ALL_ON_DEVICE_S / sum(b.median_s for b in rec.blocks)
    (tmp_path / "network.toml").write_text(
        'mqtt_overhead_bytes = 200\n'
        f'[[nodes]]\nname = "cam"\nprofile = "rpi4"\nbench = "rec.json"\ntime_scale = {scale}\n'
        '[[nodes]]\nname = "cloud"\nprofile = "x86-dev"\nbench = "rec.json"\n'
        '[[links]]\nfrom = "cam"\nto = "cloud"\nbandwidth_mbps = 1000\nrtt_ms = 1\n'
        '[constraints]\nmin_device_blocks = 1\ncodecs = ["raw"]\n')
    config = load_trainer_config(trainer_toml(
        tmp_path, mosquitto.port, ingest={"enabled": False}, split={"enabled": True},
        adapt={"enabled": True, "network": tmp_path / "network.toml", "devices": ["cam-1"],
               "sustain": 3}))
    write_inputs(tmp_path / "inputs.npz", 200)
    cfg = agent_config(
        tmp_path, mosquitto.port, tmp_path / "model" / "manifest.json", device="cam-1",
        source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 200, "loop": True},
        uplink={"boundaries": [0], "codec": "raw", "allow_raw_upload": True},
        split={"enabled": True},
        update={"enabled": True, "public_keys": [tmp_path / "keys" / "knet-update.pub"],
                "request_interval_s": 0.5, "first_request_after_s": 0.3,
                "download_timeout_s": 20, "min_canary_inputs": 4},
        **{"update.health": {"watch_s": 0}})
    with TrainerService(config) as svc, running_agent(cfg) as agent:
        session = agent.link.session
        assert wait_until(lambda: agent.split.counts().replies >= 50, 30)
        agent.link.shape(SLOW)
        assert wait_until(lambda: agent.slot.current.manifest.last > 1, 90), \
            (svc.adapter.stats, agent.stats()["network"], list(agent.updater.reports)[-3:])
        count = agent._infer_counts()[0]
        assert wait_until(lambda: agent._infer_counts()[0] > count + 50, 30)  # serving
        agent.link.shape(0)
        assert wait_until(lambda: agent.slot.current.manifest.last == 1, 90), \
            (svc.adapter.stats, agent.stats()["network"], list(agent.updater.reports)[-3:])
        replies = agent.split.counts().replies
        assert wait_until(lambda: agent.split.counts().replies > replies + 20, 30)
        assert agent.link.session == session
        assert svc.adapter.stats["switches"] == 2 and svc.adapter.stats["bad_stats"] == 0
        assert svc.split.stats["errors"] == 0


def test_adapt_section_is_validated() -> None:
    from pydantic import ValidationError

    from cloud_trainer.trainer_config import AdaptSection

    assert not AdaptSection().enabled
    for bad, field in (({"enabled": True, "devices": ["cam-1"]}, "adapt.network"),
                       ({"devices": ["Cam 1"]}, "devices"), ({"margin": 1.0}, "margin"),
                       ({"sustain": 0}, "sustain"), ({"every": 1}, "every")):
        with pytest.raises(ValidationError, match=field):
            AdaptSection.model_validate(bad)


@pytest.mark.mqtt
@pytest.mark.slow
def test_an_assignment_cannot_move_the_first_block_or_swap_weights_under_one_version(
        tmp_path: Path, mosquitto: Mosquitto, model: Any) -> None:
    from update_helpers import export_version, perturb

    root, full, _rec = model
    dev_model, key, pub = _provision_device(tmp_path, root, full.slice(1, 2), inputs=100)
    other = export_version(tmp_path / "other", 1, perturb((1,)))  # block 1 changed, still v1
    cfg = agent_config(
        tmp_path, mosquitto.port, dev_model / "manifest.json",
        source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 100, "loop": True},
        uplink={"enabled": False},
        update={"enabled": True, "public_keys": [pub], "request_interval_s": 0.5,
                "first_request_after_s": 0.3, "download_timeout_s": 20,
                "min_canary_inputs": 4},
        **{"update.health": {"watch_s": 0}})
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="knet-assign-test",
                         protocol=mqtt.MQTTv5)
    publisher = BlobPublisher(client, T, tmp_path / "blobs", push_delay=0.1)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        publisher.start()
        with running_agent(cfg) as agent:
            def rejected() -> list[Any]:
                return [r for r in agent.updater.reports if r.status == "rejected"]

            for part, directory, assign, reason in (
                    (full, root / "full", {"first": 2, "last": 4}, "incompatible"),
                    (other, tmp_path / "other", {"first": 1, "last": 3}, "replayed")):
                base, files = make_update(FLEET, "digits", 1, {"": (part, directory)},
                                          chunk_size=CHUNK)
                moved = validate_manifest({**base.model_dump(mode="json"),
                                           "assignments": {"dev-1": assign}})
                seen = len(rejected())
                publisher.publish_update(sign_manifest(moved, key), files, timeout=20)
                assert wait_until(lambda n=seen: len(rejected()) > n, 20)
                assert rejected()[-1].reason == reason, rejected()[-1]
                m = agent.slot.current.manifest
                assert (m.first, m.last) == (1, 2)  # still the configured slice
    finally:
        publisher.close()
        client.disconnect()
        client.loop_stop()
