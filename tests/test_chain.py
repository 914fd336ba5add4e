"""Multi-device chains: three real knet-agent processes relaying `vision` activations over
a real Mosquitto; results equal single-process inference; restarts lose and duplicate
nothing."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import agent_config, start_agent
from mqtt_helpers import Collector, wait_until

from agent.config import UpstreamSource
from agent.infer.chain import ChainError, Dedup, UpstreamFrames
from agent.infer.manifest import PartitionManifest
from agent.infer.profiles import load_profile
from agent.infer.runtime import BlockRunner
from agent.infer.sources import BadInputs
from agent.wire.codec import decode, encode
from agent.wire.envelope import Envelope
from agent.wire.topics import Topics

pytestmark = pytest.mark.mqtt
T = Topics("lab")
SLICES = {"stage-a": (1, 2), "stage-b": (3, 3), "stage-c": (4, 5)}
CODECS = {"stage-a": "uint8+lz4", "stage-b": "fp16+lz4", "stage-c": "raw"}


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], Path]:
    """The (untrained, seeded) vision student, one deployable directory per stage."""
    from cloud_trainer.models.data import vision_frames
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.models.zoo import get_pair

    root = tmp_path_factory.mktemp("vision")
    full_dir = root / "full"
    full = export_partition(get_pair("vision").student, full_dir, model_id="vision",
                            model_version=1, ort_version="1.16.3", verify=False)
    dirs = {}
    for name, (first, last) in SLICES.items():
        d = root / name
        d.mkdir()
        part = full.slice(first, last)
        for b in part.blocks:
            shutil.copy2(full_dir / b.file, d / b.file)
        part.dump(d / "manifest.json")
        dirs[name] = d
    x, y = vision_frames(40, seed=3)
    np.savez(root / "frames.npz", x=x, y=y)
    return full_dir, dirs, root / "frames.npz"


def expected_logits(full_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(single-process logits, the same with each link's codec round trip) per input."""
    runner = BlockRunner(PartitionManifest.load(full_dir / "manifest.json"), full_dir,
                         load_profile("x86-dev"))
    plain, relayed = [], []
    for i in range(len(x)):
        plain.append(runner.run(x[i:i + 1])[-1][0])
        a = x[i:i + 1]
        for name, (first, last) in SLICES.items():
            for j in range(first, last + 1):
                a = runner.run_block(j, a)
            if last < 5:
                a = decode(encode(a, CODECS[name]))
        relayed.append(a[0])
    return np.array(plain), np.array(relayed)


def stage_configs(tmp: Path, port: int, dirs: dict[str, Path], frames: Path,
                  rate_hz: float = 0.0) -> dict[str, Path]:
    names = list(SLICES)
    cfgs = {}
    for i, name in enumerate(names):
        source = ({"kind": "npz", "path": frames, "rate_hz": rate_hz} if i == 0 else
                  {"kind": "upstream", "device": names[i - 1]})
        cfgs[name] = agent_config(tmp, port, dirs[name] / "manifest.json", device=name,
                                  source=source, uplink={"enabled": False},
                                  chain={"enabled": True, "codec": CODECS[name]})
    return cfgs


def results(sub: Collector) -> list[dict]:
    return [json.loads(p) for p in sub.payloads(T.result("stage-c"))]


def wait_subscribed(stats: Collector, device: str, timeout: float = 60) -> None:
    """A stage's first stats message comes after its upstream subscription (same stream)."""
    assert stats.wait_for(lambda m: any(t == T.stats(device) for t, _p, _r in m), timeout), \
        f"{device} never published stats"


def drained(messages: list[tuple[str, bytes, bool]], device: str) -> bool:
    """``device`` published stats with nothing spooled (all it sent is acknowledged)."""
    return any(t == T.stats(device) and json.loads(p)["spool_records"] == 0
               for t, p, _r in messages)


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return out


@pytest.mark.slow
def test_three_stage_chain_equals_single_process_inference(tmp_path: Path, mosquitto,
                                                           vision) -> None:
    full_dir, dirs, frames = vision
    x = np.load(frames)["x"][:24]
    np.savez(tmp_path / "frames.npz", x=x)
    cfgs = stage_configs(tmp_path, mosquitto.port, dirs, tmp_path / "frames.npz")
    procs = {}
    with Collector(mosquitto.host, mosquitto.port, T.result("stage-c")) as sub, \
            Collector(mosquitto.host, mosquitto.port, T.all_devices("stats")) as stats:
        try:
            for name in ("stage-c", "stage-b"):
                procs[name] = start_agent(cfgs[name])
                wait_subscribed(stats, name)
            procs["stage-a"] = start_agent(cfgs["stage-a"])
            complete = sub.wait_for(lambda m: len(m) >= len(x), 120)
        finally:
            logs = {n: stop(p) for n, p in procs.items()}
            for n, text in logs.items():
                (tmp_path / f"{n}.log").write_text(text)
    got = results(sub)
    assert complete, (f"{len(got)}/{len(x)} results",
                      {n: text[-1500:] for n, text in logs.items()})
    assert [r["origin"][2] for r in got] == list(range(len(x))), logs["stage-c"][-2000:]
    assert {r["origin"][0] for r in got} == {"stage-a"}
    logits = np.array([r["logits"] for r in got], dtype=np.float32)
    plain, relayed = expected_logits(full_dir, x)
    # bit-for-bit the per-link codec round trips, and within codec tolerance of one process
    np.testing.assert_allclose(logits, relayed, rtol=1e-4, atol=1e-5)
    scale = float(np.abs(plain).max())
    assert float(np.abs(logits - plain).max()) <= 0.05 * scale
    assert (logits.argmax(1) == plain.argmax(1)).mean() >= 0.9
    # the head reports what its uplink achieved (agent/mqtt/netmeter.py): PUBACK round trip, rate
    nets = [json.loads(p)["network"] for p in stats.payloads(T.stats("stage-a"))]
    assert any(n["rtt_ms"] is not None and n["rtt_ms"] > 0 and n["uplink_bytes_per_s"] > 0
               for n in nets), nets[-3:]


def test_netmeter_window_and_median() -> None:
    from agent.mqtt.netmeter import NetMeter

    m = NetMeter(window_s=10.0)
    assert m.snapshot(now=0.0) == {"rtt_ms": None, "uplink_bytes_per_s": 0.0,
                                   "acked_in_window": 0, "delivery_ms_p50": None,
                                   "delivery_ms_p99": None}
    for i in range(5):
        m.acked(0.001 * (i + 1), 1000, now=100.0 + i)
    snap = m.snapshot(now=105.0)
    assert snap["rtt_ms"] == pytest.approx(3.0) and snap["acked_in_window"] == 5
    assert snap["uplink_bytes_per_s"] == pytest.approx(5000 / 5.0)
    assert m.snapshot(now=200.0)["acked_in_window"] == 0  # old acks leave the window
    # inference -> PUBACK of each sample a message carried (a batch: several at once)
    m.delivered([0.001 * i for i in range(1, 101)])
    snap = m.snapshot(now=200.0)
    assert snap["delivery_ms_p50"] == pytest.approx(51.0)
    assert snap["delivery_ms_p99"] == pytest.approx(100.0)


@pytest.mark.slow
def test_middle_stage_kill_and_broker_restart_lose_and_duplicate_nothing(
        tmp_path: Path, mosquitto, vision) -> None:
    _full_dir, dirs, frames = vision
    n = 40
    cfgs = stage_configs(tmp_path, mosquitto.port, dirs, frames, rate_hz=25.0)
    procs: dict[str, subprocess.Popen[str]] = {}
    sub = Collector(mosquitto.host, mosquitto.port, T.result("stage-c"),
                    client_id="result-watcher", persistent=True).start()
    stats = Collector(mosquitto.host, mosquitto.port, T.all_devices("stats")).start()
    try:
        for name in ("stage-c", "stage-b"):
            procs[name] = start_agent(cfgs[name])
            wait_subscribed(stats, name)
        procs["stage-a"] = start_agent(cfgs["stage-a"])
        assert sub.wait_for(lambda m: len(m) >= 8, 60)
        procs["stage-b"].send_signal(signal.SIGKILL)  # mid-stream, mid-input
        procs["stage-b"].wait(10)
        procs["stage-b"] = start_agent(cfgs["stage-b"])  # same state dir, same session
        assert sub.wait_for(lambda m: len(m) >= 20, 60)
        mosquitto.restart(downtime=0.5)  # persistence keeps the stages' queued inputs
        complete = wait_until(lambda: len({r["origin"][2] for r in results(sub)}) >= n, 120)
        if complete:  # late re-sends must be harmless: wait until no stage has any left
            since = len(stats.messages)
            stats.expect(lambda m: all(drained(m[since:], name) for name in SLICES), 60,
                         "a stats message with an empty spool from every stage")
    finally:
        logs = {name: stop(p) for name, p in procs.items()}
        sub.stop()
        stats.stop()
    assert complete, (len(results(sub)), logs["stage-b"][-3000:])
    # The last hop is at-least-once like every spooled message: a result whose PUBACK the
    # broker restart swallowed is sent again, identical; the consumer keeps the first copy
    # per origin. Within the chain, the killed stage's redelivered inputs were deduplicated.
    first: dict[int, bytes] = {}
    order = []
    for payload in sub.payloads(T.result("stage-c")):
        idx = json.loads(payload)["origin"][2]
        if idx in first:
            assert payload == first[idx], f"result {idx} differs from its first copy"
            continue
        first[idx] = payload
        order.append(idx)
    assert order == list(range(n)), (order, logs["stage-b"][-3000:])


def test_upstream_messages_are_checked_and_deduplicated(vision) -> None:
    _full, dirs, _frames = vision
    m = PartitionManifest.load(dirs["stage-b"] / "manifest.json")
    bad = BadInputs()
    src = UpstreamFrames(UpstreamSource(kind="upstream", device="stage-a"),
                         m.blocks[0].input_shape, bad)
    acked: list[int] = []
    src.bind(m, Dedup(None), lambda mid, _q: acked.append(mid))
    a = np.zeros((1, *m.blocks[0].input_shape), np.float32)

    def env(**kw: object) -> bytes:
        base = {"device": "stage-a", "session": 1, "seq": 1, "timestamp": 0.0,
                "model_version": 1, "boundary": 2, "payload": encode(a, "fp16"),
                "meta": {"model": "vision", "origin": ["stage-a", 1, 0]}}
        return Envelope(**{**base, **kw}).pack()  # type: ignore[arg-type]

    class Msg:
        def __init__(self, payload: bytes, mid: int) -> None:
            self.payload, self.mid, self.qos, self.topic = payload, mid, 1, "t"

    src.offer_message(Msg(env(), 1))
    src.offer_message(Msg(env(), 2))  # the same origin again: a redelivery
    src.offer_message(Msg(env(boundary=1), 3))
    src.offer_message(Msg(env(device="stage-x"), 4))
    src.offer_message(Msg(env(meta={"model": "vision", "origin": "x"}), 5))
    src.offer_message(Msg(b"KNAE" + bytes(100), 6))
    src.offer_message(Msg(env(meta={"model": "vision", "origin": ["stage-a", 1, 1]}), 7))
    assert acked == [2, 3, 4, 5, 6]  # accepted ones wait for their output to be spooled
    assert src.duplicates == 1 and bad.counts["chain"] == 4
    src.close()
    assert [s.origin[2] for s in src] == [0, 1]
    with pytest.raises(ChainError):
        src.parse(env(device="stage-x"))


def test_dedup_marks_persist(tmp_path: Path) -> None:
    d = Dedup(tmp_path / "d.json")
    assert d.take(("a", 1, 0)) and d.take(("a", 1, 1)) and not d.take(("a", 1, 1))
    d.done(("a", 1, 1))
    again = Dedup(tmp_path / "d.json")
    assert not again.take(("a", 1, 0)) and again.take(("a", 1, 2)) and again.take(("a", 2, 0))
    (tmp_path / "d.json").write_text("{garbage")
    assert Dedup(tmp_path / "d.json").take(("a", 1, 0))


def test_chain_acl_lets_a_stage_read_only_its_upstream_relay(tmp_path: Path) -> None:
    from mqtt_helpers import Collector as Sub

    from broker.launcher import Mosquitto, free_port
    from broker.provision import (
        ProvisionError,
        fleet_settings,
        layout,
        load_registry,
        provision_device,
    )

    d = tmp_path / "fleet"
    a = provision_device(d, "stage-a", "lab")
    b = provision_device(d, "stage-b", "lab", upstream="stage-a")
    c = provision_device(d, "stage-c", "lab")
    with pytest.raises(ProvisionError):
        provision_device(d, "stage-x", "lab", upstream="nobody")
    b = provision_device(d, "stage-b", "lab")  # rotating credentials keeps the link
    assert load_registry(d)["devices"]["stage-b"]["upstream"] == "stage-a"
    with Mosquitto(layout(d).broker, fleet_settings(d, port=free_port())) as broker:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        subs = {name: Sub(broker.host, broker.port, "knet/v1/lab/stage-a/#",
                          username=cred.username, password=cred.password).start()
                for name, cred in (("b", b), ("c", c))}
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="stage-a",
                          protocol=mqtt.MQTTv5)
        pub.username_pw_set(a.username, a.password)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        try:
            for leaf in ("act", "chain"):
                pub.publish(T.device("stage-a", leaf), leaf.encode(), qos=1).wait_for_publish(5)
            # "act" was published before "chain": had b been sent it, it would be first.
            assert subs["b"].wait_for(lambda m: len(m) >= 1, 5)
            subs["c"].barrier("knet/v1/lab/stage-c/probe")  # all c will get has come
            assert subs["b"].payloads() == [b"chain"]
            assert subs["c"].payloads() == []
        finally:
            pub.disconnect()
            pub.loop_stop()
            for s in subs.values():
                s.stop()
