"""The agent as a user runs it: `knet-agent --config agent.toml` against a real Mosquitto."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from agent_helpers import (
    agent_config,
    envelopes,
    exported_digits,
    spooled,
    start_agent,
    write_inputs,
)
from mqtt_helpers import Collector, eventually, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.wire.codec import decode
from agent.wire.topics import Topics
from broker.launcher import Mosquitto

pytestmark = pytest.mark.mqtt
T = Topics("lab")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported_digits(tmp_path_factory.mktemp("model"))


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_activations_arrive_decodable_in_order_and_counted_exactly(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    write_inputs(tmp_path / "inputs.npz", 300)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json")
    with Collector(mosquitto.host, mosquitto.port, T.act("dev-1")) as sub:
        finish(start_agent(cfg, "--exit-when-done"))
        assert sub.wait_for(lambda m: len(m) >= 600, 10)
        envs = envelopes(sub.payloads())
    assert len(envs) == 600  # 300 inputs × boundaries 1 and 2, no more, no less
    assert [e.seq for e in envs] == list(range(1, 601))
    assert len({e.session for e in envs}) == 1
    assert [e.boundary for e in envs[:4]] == [1, 2, 1, 2]
    first = decode(envs[0].payload)
    assert first.shape == (1, 16, 8, 8) and decode(envs[1].payload).shape == (1, 32, 4, 4)
    assert all(e.label is not None and e.prediction is not None for e in envs)
    assert [e.meta["index"] for e in envs[::2]] == list(range(300))
    # each message holds its own input's activations (the agent's inference buffers are
    # reused from one input to the next: a message must carry a copy, not the next input's)
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner

    runner = BlockRunner(PartitionManifest.load(model_dir / "manifest.json"), model_dir,
                         load_profile("x86-dev"))
    x = np.load(tmp_path / "inputs.npz")["x"]
    for env in envs:
        want = runner.run(x[env.meta["index"]][None])
        got = decode(env.payload)
        act = want[env.boundary - 1]
        assert np.abs(got - act).max() <= (act.max() - act.min()) / 255 + 1e-6
        assert env.prediction == int(want[-1].argmax())


def test_broker_outage_mid_stream_loses_nothing(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    n = 400
    write_inputs(tmp_path / "inputs.npz", n)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 200},
                       uplink={"boundaries": [2]})
    sub = Collector(mosquitto.host, mosquitto.port, T.act("dev-1"), client_id="trainer",
                    persistent=True).start()
    proc = start_agent(cfg, "--exit-when-done")
    assert sub.wait_for(lambda m: len(m) >= 50, 10)
    mosquitto.stop()  # while the agent keeps producing into its spool
    eventually(lambda: spooled(tmp_path / "state-dev-1") >= 50, 30,
               "the agent to spool 50 samples while the broker is down")
    mosquitto.start()
    finish(proc)
    assert sub.wait_for(lambda m: len({e.seq for e in envelopes([p for _, p, _ in m])}) >= n, 20)
    seqs = [e.seq for e in envelopes(sub.payloads())]
    sub.stop()
    assert sorted(set(seqs)) == list(range(1, n + 1))  # every sample, duplicates allowed


def test_agent_killed_while_offline_delivers_its_spool_after_restart(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    write_inputs(tmp_path / "inputs.npz", 2000)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 300},
                       uplink={"boundaries": [3]})
    sub = Collector(mosquitto.host, mosquitto.port, T.act("dev-1"), client_id="trainer",
                    persistent=True).start()
    proc = start_agent(cfg)
    assert sub.wait_for(lambda m: len(m) >= 20, 10)
    mosquitto.stop()
    eventually(lambda: spooled(tmp_path / "state-dev-1") >= 200, 30,
               "the agent to spool 200 samples while the broker is down")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    online_before = {e.seq for e in envelopes(sub.payloads())}
    mosquitto.start()
    proc = start_agent(cfg)  # as systemd would restart it
    try:
        # Session 1's spool drains first, in order: its sequence numbers have no gap.
        def drained(m: list) -> bool:
            s1 = [e.seq for e in envelopes([p for _, p, _ in m]) if e.session == 1]
            return len(s1) > len(online_before) + 100 and any(
                e.session == 2 for e in envelopes([p for _, p, _ in m]))
        assert sub.wait_for(drained, 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc)
        sub.stop()
    envs = envelopes(sub.payloads())
    s1 = sorted({e.seq for e in envs if e.session == 1})
    assert s1 == list(range(1, s1[-1] + 1))
    assert s1[-1] > max(online_before) + 100  # the offline samples came from the spool


def test_sigterm_publishes_stopped_and_exits_zero(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    write_inputs(tmp_path / "inputs.npz", 50)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 20,
                               "loop": True})
    with Collector(mosquitto.host, mosquitto.port, T.device("dev-1", "+")) as sub:
        proc = start_agent(cfg)
        assert sub.wait_for(lambda m: any(t.endswith("/stats") for t, _, _ in m), 15)
        proc.send_signal(signal.SIGTERM)
        finish(proc)
        assert sub.wait_for(lambda m: any(t.endswith("/state") and b'"stopped"' in p
                                          for t, p, _ in m), 5)
        topics = [t.rsplit("/", 1)[1] for t, _, _ in sub.messages]
    assert topics.index("birth") < topics.index("state")  # birth before online
    births = [json.loads(p) for t, p, _ in sub.messages if t.endswith("/birth")]
    assert births[0]["model_id"] == "digits" and births[0]["profile"] == "x86-dev"
    assert births[0]["partition"] == {"first": 1, "last": 4, "num_blocks": 4}


def _publish_frames(port: int, topic: str, frames: list[tuple[bytes, int | None]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for payload, label in frames:
        props = Properties(PacketTypes.PUBLISH)
        if label is not None:
            props.UserProperty = ("label", str(label))
        c.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_garbage_on_the_input_topic_is_counted_and_the_agent_keeps_running(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "mqtt"},
                       uplink={"boundaries": [0], "allow_raw_upload": True})
    good = np.random.default_rng(0).random((1, 8, 8), dtype=np.float32)
    with Collector(mosquitto.host, mosquitto.port, T.device("dev-1", "+")) as sub:
        proc = start_agent(cfg)
        # The input subscription may be made after `online`, but always before the first
        # stats message (the same connection, in order): then the broker has it.
        sub.expect(lambda m: any(t.endswith("/stats") for t, _, _ in m), 15,
                   "the agent's first stats message")
        _publish_frames(mosquitto.port, T.input("dev-1"), [
            (b"\x00garbage\xff" * 10, None),            # not an image, not an array
            (_npy(np.zeros((5, 5), np.float32)), None),  # wrong shape
            (b"\x93NUMPY\x01\x00broken", None),          # truncated .npy
            (_npy(good), 7),                             # a good frame with a label
        ])
        assert sub.wait_for(lambda m: any(t.endswith("/act") for t, _, _ in m), 10)

        def bad_counted(m: list) -> bool:
            stats = [json.loads(p) for t, p, _ in m if t.endswith("/stats")]
            return bool(stats) and sum(stats[-1]["bad_inputs"].values()) >= 3
        assert sub.wait_for(bad_counted, 10)
        assert proc.poll() is None  # still running
        proc.send_signal(signal.SIGTERM)
        finish(proc)
        act = envelopes(sub.payloads(T.act("dev-1")))
    assert len(act) == 1 and act[0].label == 7
    assert np.allclose(decode(act[0].payload)[0], good, atol=1 / 255)  # the raw input


def test_corrupt_npz_rows_are_counted_not_fatal(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    write_inputs(tmp_path / "inputs.npz", 20, bad_rows=(3, 11))
    # A second file whose archive member is damaged on disk.
    write_inputs(tmp_path / "broken.npz", 20)
    raw = bytearray((tmp_path / "broken.npz").read_bytes())
    raw[200:260] = b"\xff" * 60
    (tmp_path / "broken.npz").write_bytes(bytes(raw))
    for name, expected_sent in (("inputs.npz", 18), ("broken.npz", 0)):
        cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                           device=f"dev-{name[0]}",
                           source={"kind": "npz", "path": tmp_path / name},
                           uplink={"boundaries": [1]})
        device = f"dev-{name[0]}"
        with Collector(mosquitto.host, mosquitto.port, T.device(device, "+")) as sub:
            finish(start_agent(cfg, "--exit-when-done"))
            # The exit came once the broker had every message, not this subscriber: wait
            # for the last ones. `stopped` is published after the final stats message.
            state = T.state(device)
            sub.expect(lambda m, state=state: any(t == state and b'"stopped"' in p
                                                  for t, p, _ in m),
                       10, f"{device}'s stopped state")
            stats = [json.loads(p) for p in sub.payloads(T.stats(device))]
            acts = sub.payloads(T.act(device))
        assert stats, "no stats message"
        assert len(acts) == expected_sent
        assert sum(stats[-1]["bad_inputs"].values()) >= 1


def test_ready_and_watchdog_go_to_the_notify_socket(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    write_inputs(tmp_path / "inputs.npz", 50)
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 50,
                               "loop": True})
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(15)
        proc = start_agent(cfg, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        got: list[str] = []
        try:
            while not ("READY=1" in got and got.count("WATCHDOG=1") >= 2):
                got += sock.recv(4096).decode().splitlines()
        finally:
            proc.send_signal(signal.SIGTERM)
            finish(proc)
        got += sock.recv(4096).decode().splitlines()
    assert got.index("READY=1") < got.index("WATCHDOG=1")
    assert "STOPPING=1" in got


def test_check_validates_without_connecting(tmp_path: Path, model_dir: Path) -> None:
    write_inputs(tmp_path / "inputs.npz", 5)
    cfg = agent_config(tmp_path, 1, model_dir / "manifest.json")  # nothing listens on port 1
    ok = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(cfg), "--check"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "ok: device dev-1" in ok.stdout
    bad = cfg.read_text().replace('codec = "uint8+lz4"', 'codec = "uint8+lz4"\ncodecs = 1')
    cfg.write_text(bad)
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(cfg), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "uplink.codecs" in res.stderr and "unknown key" in res.stderr


def test_check_refuses_a_block_that_does_not_match_its_sha256(tmp_path: Path,
                                                              model_dir: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    blob = copy / "block-02.onnx"
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    write_inputs(tmp_path / "inputs.npz", 5)
    cfg = agent_config(tmp_path, 1, copy / "manifest.json")
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(cfg), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "sha256" in res.stderr and "block 2" in res.stderr


def test_spool_restart_marker(tmp_path: Path) -> None:
    """wait_until is the polling primitive the tests use; it must time out, not hang."""
    t0 = time.monotonic()
    assert not wait_until(lambda: False, 0.2)
    assert time.monotonic() - t0 < 2


def test_sighup_reloads_the_uplink_policy_and_prometheus_serves_metrics(
        tmp_path: Path, mosquitto: Mosquitto, model_dir: Path) -> None:
    import urllib.request

    from broker.launcher import free_port

    write_inputs(tmp_path / "inputs.npz", 50)
    prom = free_port()
    cfg = agent_config(tmp_path, mosquitto.port, model_dir / "manifest.json",
                       source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 100,
                               "loop": True},
                       uplink={"boundaries": [1], "codec": "raw"},
                       metrics={"prometheus_port": prom})
    with Collector(mosquitto.host, mosquitto.port, T.act("dev-1")) as sub:
        proc = start_agent(cfg)
        try:
            assert sub.wait_for(lambda m: len(m) >= 20, 15)
            cfg.write_text(cfg.read_text().replace('codec = "raw"', 'codec = "uint8+lz4"'))
            proc.send_signal(signal.SIGHUP)
            assert sub.wait_for(lambda m: len(m[-1][1]) < 2000, 10)  # smaller frames now
            text = urllib.request.urlopen(f"http://127.0.0.1:{prom}/metrics", timeout=5).read()
        finally:
            proc.send_signal(signal.SIGTERM)
            finish(proc)
    sizes = [len(p) for p in sub.payloads()]
    assert sizes[0] > 4096 and sizes[-1] < 2000
    metrics = text.decode()
    for name in ("knet_frames_total", "knet_inference_seconds_bucket", "knet_bytes_out_total",
                 "knet_spool_bytes", "knet_queue_depth"):
        assert name in metrics
    frames = [line for line in metrics.splitlines() if line.startswith("knet_frames_total")]
    assert float(frames[0].split()[1]) > 20
