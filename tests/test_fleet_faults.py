"""Faults on a real fleet: real processes (knet broker run, knet-trainer, knet-agent) on a
provisioned, ACL'd Mosquitto on loopback (``knet_lab.fleet``).

Loss is judged from the agent's own numbering: with ``every_n = 1`` and one uplinked
boundary every inferred frame becomes exactly one envelope, and the envelopes of one
session are numbered 1, 2, 3, ... — so the store must hold, per session, every number from
1 to the last, each once (its primary key makes a second copy impossible; the ingestor
counts the duplicates it dropped).

The devices use the ``jetson-nano`` profile: its onnxruntime 1.16 target is exported by the
legacy exporter, which keeps each retraining run's export well under a second.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from agent_helpers import spooled
from mqtt_helpers import Collector, eventually, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from agent.wire.codec import encode
from agent.wire.envelope import Envelope
from knet_lab.fleet import Camera, DeviceSpec, Lab, LabSettings, pids_alive

pytestmark = [pytest.mark.slow]

PROFILE = "jetson-nano"


def lab_for(tmp_path: Path, n: int = 1, *, source: dict[str, Any] | None = None,
            **settings: Any) -> Lab:
    devices = [DeviceSpec(f"cam-{i}", PROFILE, {"every_n": 1, "boundaries": [0],
                                                "codec": "uint8+lz4"}) for i in range(n)]
    extra = {"source": source} if source else {}
    settings.setdefault("interval_s", 3600.0)  # no scheduled run unless a test wants one
    return Lab(LabSettings(root=tmp_path / "lab", devices=devices, agent_extra=extra,
                           stats_interval_s=0.5, **settings))


def stored(lab: Lab) -> dict[str, dict[int, list[int]]]:
    """device -> session -> sorted seqs in the trainer's store (read-only, live)."""
    db = lab.trainer_dir / "store"
    files = sorted(db.glob("*.sqlite*")) if db.is_dir() else []
    out: dict[str, dict[int, list[int]]] = {}
    if not files:
        return out
    from cloud_trainer.ingest.store import _from_i64

    con = sqlite3.connect(f"file:{files[0]}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT device, session, seq FROM samples").fetchall()
    finally:
        con.close()
    for d, s, q in rows:
        out.setdefault(d, {}).setdefault(_from_i64(s), []).append(_from_i64(q))
    for sessions in out.values():
        for seqs in sessions.values():
            seqs.sort()
    return out


def count_stored(lab: Lab, device: str) -> int:
    return sum(len(v) for v in stored(lab).get(device, {}).values())


def assert_contiguous(lab: Lab, device: str, expected: int | None = None) -> None:
    """Every session's seqs are 1..max, each once; ``expected`` envelopes in all."""
    sessions = stored(lab).get(device, {})
    assert sessions, f"nothing stored for {device}"
    total = 0
    for session, seqs in sessions.items():
        missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))
        assert not missing and len(seqs) == seqs[-1], (
            f"{device} session {session}: missing {missing[:10]}")
        total += len(seqs)
    if expected is not None:
        assert total == expected


def wait_saved(lab: Lab, timeout: float = 15.0) -> None:
    """Until Mosquitto saved its database after the trainer's ingest session was created.

    Mosquitto persists sessions and queues only every ``autosave_interval`` (5 s here), so a
    SIGKILL sooner would forget the ingest session, and activations the restarted broker
    accepts before the ingestor re-subscribes would have no subscriber (module doc of
    ``knet_lab.fleet``; docs/deploy.md).
    """
    broker = lab.broker_dir / "broker"
    log_file, db = broker / "mosquitto.log", broker / "data" / "mosquitto.db"

    def saved() -> bool:
        text = log_file.read_text(errors="replace")
        at = text.rfind(".ingest (p5")  # the session is named by its username: <trainer>.ingest
        save = text.find("Saving in-memory database", at) if at >= 0 else -1
        if save < 0:
            return False
        # "<epoch>: Saving ..." is logged before mosquitto.db.new is written and renamed
        # to mosquitto.db: that save is done once no .new is left and mosquitto.db is at
        # least as new as the line (the save before it is autosave_interval = 5 s older).
        logged = int(text[text.rfind("\n", 0, save) + 1:save].split(":", 1)[0])
        return (not db.with_name("mosquitto.db.new").exists() and db.exists()
                and db.stat().st_mtime >= logged)

    eventually(saved, timeout, "Mosquitto to save its database with the ingest session",
               interval=0.1)


def agent_state(lab: Lab, device: str) -> Path:
    return lab.root / "agents" / device / "state"


def inputs_npz(path: Path, n: int) -> Path:
    from cloud_trainer.models.data import digits_splits

    s = digits_splits()
    np.savez(path, x=np.resize(s.x_test, (n, 1, 8, 8)).astype(np.float32),
             y=np.resize(s.y_test, n))
    return path


def stats(lab: Lab, device: str) -> dict[str, Any]:
    assert lab.console is not None
    with lab.console.lock:
        return dict(lab.console.view(device).stats)


# -- a broker crash while the fleet streams ------------------------------------------------
def test_broker_killed_and_restarted_during_streaming_loses_nothing(tmp_path: Path) -> None:
    n = 900
    inputs = inputs_npz(tmp_path / "inputs.npz", n)
    with lab_for(tmp_path, 1, source={"kind": "npz", "path": inputs, "rate_hz": 120}) as lab:
        lab.prepare()
        lab.start()
        assert lab.wait_online(60)
        assert wait_until(lambda: count_stored(lab, "cam-0") >= 150, 30)
        wait_saved(lab)
        lab.kill_broker()  # SIGKILL: no goodbye, no final save
        eventually(lambda: spooled(agent_state(lab, "cam-0")) >= 150, 30,
                   "the agent to spool 150 envelopes while the broker is down", interval=0.1)
        lab.start_broker()
        assert wait_until(lambda: stats(lab, "cam-0").get("frames") == n
                          and stats(lab, "cam-0").get("spool_records") == 0, 60)
        assert wait_until(lambda: count_stored(lab, "cam-0") >= n, 90), count_stored(lab, "cam-0")
        assert_contiguous(lab, "cam-0", n)
        assert stats(lab, "cam-0")["link"]["reconnects"] >= 1
        procs = dict(lab.procs)
    assert all(p.popen is not None and p.popen.returncode == 0 for name, p in procs.items()
               if name != "broker")


# -- a client with valid credentials sends garbage everywhere it can ------------------------
def _garbage() -> list[bytes]:
    rng = random.Random(7)
    valid = Envelope(device="cam-1", session=1, seq=1, timestamp=time.time(),
                     model_version=1, boundary=0,
                     payload=encode(np.zeros((1, 1, 8, 8), np.float32), "raw")).pack()
    return [b"", b"\x00", b"{", b'{"state": "online", "session": -1}', b"null",
            json.dumps({"device": "cam-0", "status": "applied", "version": 99}).encode(),
            bytes(rng.getrandbits(8) for _ in range(300)), b"KNCF" + bytes(60),
            b"\x93NUMPY" + bytes(40), valid, valid[: len(valid) // 2],
            b"\xff" * (256 * 1024)]


def test_malicious_client_with_valid_credentials(tmp_path: Path) -> None:
    with lab_for(tmp_path, 2) as lab:
        lab.prepare()
        lab.start()
        assert lab.wait_online(60)
        t = lab.topics
        own = [t.device("cam-0", leaf) for leaf in
               ("state", "birth", "act", "stats", "update", "input", "infer", "result",
                "blobreq", "reply", "x")]
        foreign = [t.device("cam-1", leaf) for leaf in ("act", "input", "state", "update")] + [
            t.manifest, t.blob("0" * 64, 0), t.trainer_state("trainer-1"),
            f"{t.root}/other/cam-0/act"]
        garbage = _garbage()
        # A witness with the trainer-side view records what arrives on the foreign topics
        # (subscribed, SUBACK received, before the attack).
        witness = Collector("127.0.0.1", lab.port,
                            [f"{t.fleet_root}/cam-1/#", f"{t.fleet_root}/model/#",
                             t.trainer_state("trainer-1")],
                            client_id="witness", username="console",
                            password=lab.passwords["console"]).start()
        refused: dict[str, int] = {}
        # cam-0's credentials on its extra connection (the broker binds a session to its
        # username: under "cam-0" itself the attacker could only displace cam-0's own agent,
        # tests/test_broker_identity.py); the lab's camera for cam-0 steps aside meanwhile.
        lab.cameras.pop("cam-0").close()
        evil = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cam-0-evil",
                           protocol=mqtt.MQTTv5)
        evil.username_pw_set("cam-0.camera", lab.passwords["cam-0"])
        evil.on_publish = lambda _c, _u, mid, rc, _p: refused.__setitem__(str(mid), rc.value)
        evil.connect("127.0.0.1", lab.port)
        evil.loop_start()
        foreign_mids = set()
        for topic in own + foreign:
            for payload in garbage:
                for retain in (False, True):
                    info = evil.publish(topic, payload, qos=1, retain=retain)
                    if topic in foreign:
                        foreign_mids.add(str(info.mid))
        assert wait_until(lambda: foreign_mids <= set(refused), 30)
        assert all(refused[m] == 135 for m in foreign_mids)  # not authorised, every one
        evil.disconnect()
        evil.loop_stop()
        lab.cameras["cam-0"] = Camera("cam-0", "127.0.0.1", lab.port, lab.passwords["cam-0"],
                                      lab.topics)
        # Good frames still work on both devices afterwards.
        from cloud_trainer.models.data import digits_splits

        s = digits_splits()
        for i in range(40):
            for cam in lab.cameras.values():
                cam.send(s.x_test[i], int(s.y_test[i]), "clean", 1)
        assert wait_until(lambda: all(stats(lab, d).get("frames", 0) >= 40
                                      for d in ("cam-0", "cam-1")), 30)
        # cam-1's camera sent its frames after the broker had answered every forged
        # publish, and cam-1's agent counted them after that: once the witness has those
        # stats, anything forged that it was sent came before them.
        witness.expect(lambda m: any(tp == t.stats("cam-1") and json.loads(p)["frames"] >= 40
                                     for tp, p, _r in m), 30,
                       "cam-1's stats counting its 40 good frames at the witness")
        witness.stop()
        # Nothing the attacker sent reached a topic outside its subtree.
        assert not [tp for tp, pl, _r in witness.messages if pl in garbage and tp in foreign]
        for p in lab.procs.values():
            assert p.running(), f"{p.name} died"
        assert stats(lab, "cam-0").get("model_version") == 1
        assert stats(lab, "cam-0")["bad_inputs"].get("frame", 0) >= 1
        # The store holds only the agents' real envelopes, none claiming another device.
        store = stored(lab)
        assert set(store) <= {"cam-0", "cam-1"}
        assert_contiguous(lab, "cam-1")
        assert wait_until(lambda: count_stored(lab, "cam-0") >= 40, 20)
        assert_contiguous(lab, "cam-0")
        pids = [int(r["pid"]) for r in json.loads((lab.root / "pids.json").read_text())]
        assert len(pids) == 5  # broker wrapper, mosquitto, trainer, two agents
        codes = lab.close()
    assert codes["trainer"] == 0 and codes["cam-0"] == 0 and codes["cam-1"] == 0
    assert pids_alive(pids) == []  # nothing outlives the lab


def test_agent_sigkilled_while_spooling_then_broker_back(tmp_path: Path) -> None:
    """SIGKILL during inference with a full spool and no broker; restarted as systemd would:
    the old session's spooled envelopes are delivered, the new session streams on."""
    n = 600
    inputs = inputs_npz(tmp_path / "inputs.npz", n)
    with lab_for(tmp_path, 1, source={"kind": "npz", "path": inputs, "rate_hz": 100}) as lab:
        lab.prepare()
        lab.start()
        assert lab.wait_online(60)
        assert wait_until(lambda: count_stored(lab, "cam-0") >= 50, 30)
        wait_saved(lab)
        lab.kill_broker()
        eventually(lambda: spooled(agent_state(lab, "cam-0")) >= 100, 30,
                   "the agent to spool 100 envelopes while the broker is down", interval=0.1)
        lab.procs["cam-0"].kill()
        lab.start_broker()
        lab.start_agent("cam-0")
        assert wait_until(lambda: stats(lab, "cam-0").get("frames") == n
                          and stats(lab, "cam-0").get("spool_records") == 0, 60)
        sessions = stored(lab)["cam-0"]
        assert wait_until(lambda: len(stored(lab)["cam-0"]) == 2 and
                          len(max(stored(lab)["cam-0"].items())[1]) == n, 30)
        assert_contiguous(lab, "cam-0")
        first = min(stored(lab)["cam-0"])
        assert len(stored(lab)["cam-0"][first]) > 50  # spooled before the kill, delivered
        del sessions


# -- drift and recover, with the broker killed mid-rollout ---------------------------------
def test_drift_and_recover_with_broker_killed_during_rollout(tmp_path: Path) -> None:
    """The demo's scenario, smaller: recovery within 2 points of the teacher, zero loss,
    and the rollout completes although the broker dies as the manifest goes out."""
    import threading

    from knet_lab.demo import Scenario, build_feeds, wait_drained, wait_stored
    from knet_lab.drift import default_spec

    lab = lab_for(tmp_path, 2, interval_s=8.0, min_new_samples=300, epochs=12)
    with lab:
        lab.prepare()
        feeds = build_feeds("digits", [d.device for d in lab.s.devices],
                            default_spec("digits"), lab.pair.teacher)
        lab.start()
        assert lab.wait_online(60)
        sc = Scenario(lab, feeds, rate_hz=60.0, rounds=3, duration_s=200.0)
        killed = threading.Event()
        failed: list[BaseException] = []

        def inferred_all_sent() -> bool:
            return all(stats(lab, d).get("frames", -1) >= len(cam.sent)
                       for d, cam in lab.cameras.items())

        def chaos() -> None:
            try:
                assert lab.console is not None
                con = lab.console
                eventually(lambda: sc.stop.is_set() or con.manifests, 600,
                           "the first update manifest", interval=0.05)
                if sc.stop.is_set():
                    return
                sc.paused.set()  # the cameras hold: the fault under test is the rollout's
                # no camera frame in flight: each one sent was received and inferred
                eventually(inferred_all_sent, 30, "the agents to infer every frame sent")
                lab.kill_broker()
                killed.set()
                time.sleep(1.5)  # the outage's length: a fault parameter, not a wait
                lab.start_broker()
                eventually(lambda: all(c.client.is_connected() for c in lab.cameras.values()),
                           30, "the cameras to reconnect")
                sc.paused.clear()
            except BaseException as exc:  # reported by the test's thread below
                failed.append(exc)
                sc.paused.clear()

        threading.Thread(target=chaos, daemon=True).start()
        sc.run()
        assert not failed, failed
        assert killed.is_set(), "no update was published"
        assert wait_drained(lab, 60)
        seen, stored_keys = wait_stored(lab, 60)
        for d, p in sc.devices.items():
            assert p.phase == "recovered", (d, p.evaluations, sc.reason)
            assert p.evaluations[-1]["accuracy"] >= feeds[d].teacher_drift - 0.02
            assert_contiguous(lab, d)
            cam = lab.cameras[d]
            # no frame lost; a QoS 1 frame in flight when the broker died may arrive twice
            assert stats(lab, d)["frames"] >= len(cam.sent)
        assert seen <= stored_keys
        codes = lab.close()
    assert all(codes[d] == 0 for d in ("cam-0", "cam-1", "trainer"))


# -- the trainer and the agents SIGKILLed mid-update ---------------------------------------
def _stream(lab: Lab, x: np.ndarray, y: np.ndarray, stop: Any, rate_hz: float = 40.0) -> None:
    i = 0
    while not stop.is_set():
        for cam in lab.cameras.values():
            if cam.client.is_connected():
                cam.send(x[i % len(x)], int(y[i % len(x)]), "drift", None)
        i += 1
        time.sleep(1.0 / rate_hz)


def _reports(lab: Lab, device: str, status: str) -> list[dict[str, Any]]:
    assert lab.console is not None
    with lab.console.lock:
        return [r for r in lab.console.view(device).reports if r.get("status") == status]


def test_trainer_and_agents_sigkilled_mid_update(tmp_path: Path) -> None:
    """Trainer SIGKILLed while training, restarted: the run resumes and pushes; one agent
    SIGKILLed while downloading, another once downloaded (before the swap), both restarted:
    each comes back on a valid version, installs the update, and every spooled envelope
    reaches the store once."""
    import threading

    from cloud_trainer.release.registry import Registry
    from cloud_trainer.release.runs import RunLog
    from cloud_trainer.training.train import eval_set
    from knet_lab.demo import wait_stored
    from knet_lab.drift import apply_drift, default_spec

    lab = lab_for(tmp_path, 2, interval_s=8.0, min_new_samples=300, epochs=12)
    with lab:
        lab.prepare()
        x, y = eval_set("digits")
        xd = apply_drift(np.asarray(x), default_spec("digits"))
        lab.start()
        assert lab.wait_online(60)
        stop = threading.Event()
        feeder = threading.Thread(target=_stream, args=(lab, xd, np.asarray(y), stop),
                                  daemon=True)
        feeder.start()
        trainer_log = lab.procs["trainer"].log_path
        assert wait_until(lambda: '"message": "digits-retrain train:' in
                          trainer_log.read_text(errors="replace"), 120)
        lab.procs["trainer"].kill()
        lab.start_trainer()
        assert wait_until(lambda: bool(_reports(lab, "cam-0", "downloading")), 180)
        lab.procs["cam-0"].kill()
        lab.start_agent("cam-0")
        assert wait_until(lambda: bool(_reports(lab, "cam-1", "downloaded")), 120)
        lab.procs["cam-1"].kill()
        lab.start_agent("cam-1")
        assert wait_until(lambda: all(_reports(lab, d, "applied") for d in ("cam-0", "cam-1"))
                          and all(stats(lab, d).get("model_version", 1) > 1
                                  for d in ("cam-0", "cam-1")), 180)
        stop.set()
        feeder.join(5)
        assert wait_until(lambda: all(stats(lab, d).get("spool_records") == 0
                                      for d in ("cam-0", "cam-1")), 60)
        # every activation the console saw on the broker has reached the trainer's store
        seen, stored_keys = wait_stored(lab, 60)
        assert seen <= stored_keys, sorted(seen - stored_keys)[:10]
        for d in ("cam-0", "cam-1"):
            assert_contiguous(lab, d)
            assert len(stored(lab)[d]) >= 2  # the killed session's spool was delivered
        codes = lab.close()
    reg = Registry(lab.trainer_dir / "registry")
    versions = reg.versions("digits")
    # a version left candidate/approved belongs to a run the final SIGTERM interrupted
    # (training and export stop between steps): that run is open, to resume at next start
    open_runs = {r.run_id for r in RunLog(lab.trainer_dir / "registry").runs(
        "digits-retrain", kind="run") if r.status == "running"}
    assert all(v.info.get("run_id") in open_runs for v in versions
               if v.status in ("candidate", "approved")), [(v.version, v.status)
                                                            for v in versions]
    pushed = {v.version for v in versions if v.status in ("pushed", "superseded")}
    applied = {r["version"] for d in ("cam-0", "cam-1") for r in _reports(lab, d, "applied")}
    assert applied <= pushed, (applied, [(v.version, v.status) for v in versions])
    assert all(codes[d] == 0 for d in ("cam-0", "cam-1", "trainer"))
