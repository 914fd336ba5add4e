"""`knet bench fleet --devices N`: N simulated devices against one trainer, on loopback.

What is real: a private Mosquitto (the repo's broker config: persistence, queue limits);
the trainer is ``knet-trainer --config`` as its own process (ingest into the SQLite sample
store, fleet table, update publisher); every simulated device is an ``agent.link.Link``
with its own on-disk ``Spool`` and MQTT v5 connection — the agent's at-least-once publish
path — sending real activation envelopes (``agent.envelope``) whose payloads are the
digits student's block-1 outputs, computed once by one shared onnxruntime session and
encoded with the agent's codec. The update is a real signed manifest pushed by
``cloud_trainer.publisher.BlobPublisher`` (the trainer's publisher); each device verifies
it (``parse_signed`` with the fleet key) and downloads the changed blocks through
``agent.blobs.BlobFetcher`` into its own ``BlobCache`` (chunk and block sha256 checks).

What is simulated: no onnxruntime session per device (N sessions would not fit beside the
broker on two cores; inference cost is the agent benchmark's subject), and the update stops
after the verified download: the per-device self-test and swap build sessions and are
measured by ``knet bench update``. The broker runs without the ACL/password file (hashing N
passwords is set-up, not load).

Measured: ingest rate (stored samples per second over the streaming window), end-to-end
delay from the envelope's creation (just before ``publish_reliable``) to the row's
``received_at`` in the store (p50/p99), update rollout time (manifest published → last
device holds every verified block), peak RSS of Mosquitto, of the trainer and of this
process (the N devices), from ``/proc``; loss = envelopes created − distinct envelopes
stored (must be 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
FLEET = "bench"


def raise_nofile(needed: int) -> int:
    """Lift the soft open-files limit towards the hard one (Mosquitto inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed)) if hard != resource.RLIM_INFINITY else max(soft, needed)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        raise RuntimeError(f"{needed} open files needed, hard limit {hard}: raise it "
                           "(ulimit -Hn / LimitNOFILE) for this many devices")
    return want


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakRss(threading.Thread):
    """Samples the RSS of some processes every ``interval`` seconds; keeps the peaks."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            for name, pid in self.pids.items():
                v = rss_mib(pid)
                if v is not None:
                    self.peak[name] = max(self.peak.get(name, 0.0), v)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(2)
        return {k: round(v, 1) for k, v in self.peak.items()}


def _payloads(work: Path, codec: str, n: int = 64) -> tuple[list[bytes], Path]:
    """Block-1 activations of the digits student from one shared onnxruntime session."""
    from agent.codec import encode
    from agent.profiles import load_profile
    from agent.runtime import BlockRunner
    from cloud_trainer.deployed import deployed_student
    from cloud_trainer.export import export_partition
    from cloud_trainer.train import eval_set

    model_dir = work / "model-v1"
    student = deployed_student("digits")
    part = export_partition(student, model_dir, model_id="digits", model_version=1,
                            profile_ort_version="1.16.3")
    runner = BlockRunner(part, model_dir, load_profile("x86-dev"))
    x, _ = eval_set("digits")
    frames = []
    for i in range(n):
        acts = runner.run(np.ascontiguousarray(x[i : i + 1]))
        frames.append(encode(acts[0], codec))
    return frames, model_dir


def _trainer_config(work: Path, port: int, key: Path) -> Path:
    from cloud_trainer.fleet_lab import toml_text

    doc = {"trainer": {"id": "bench-trainer", "fleet": FLEET, "state_dir": work / "trainer",
                       "signing_key_file": key, "log_format": "json"},
           "mqtt": {"host": "127.0.0.1", "port": port},
           "models": {"digits": {"zoo": "digits", "profiles": ["x86-dev"]}},
           "store": {"max_bytes": 8 << 30, "device_max_bytes": 1 << 30},
           "ingest": {"enabled": True, "shared": False, "receive_maximum": 2000}}
    path = work / "trainer.toml"
    path.write_text(toml_text(doc))
    return path


def _store_rows(db: Path) -> list[tuple[str, int, int, float, float]]:
    from cloud_trainer.store import _from_i64

    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT device, session, seq, timestamp, received_at "
                           "FROM samples").fetchall()
    finally:
        con.close()
    return [(d, _from_i64(s), _from_i64(q), t, r) for d, s, q, t, r in rows]


def _store_count(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(con.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
    finally:
        con.close()


class SimDevice:
    """One device's uplink: its own Link (MQTT v5 connection + on-disk spool)."""

    def __init__(self, device: str, port: int, work: Path) -> None:
        from agent.link import Link, LinkSettings
        from agent.spool import Spool
        from agent.topics import Topics

        self.device = device
        self.topics = Topics(FLEET)
        d = work / "devices" / device
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        self.spool = Spool(d / "spool", 64 << 20)
        self.link = Link(LinkSettings(host="127.0.0.1", port=port, reconnect_min_delay=0.5,
                                      reconnect_max_delay=5.0, max_inflight=50),
                         self.topics, device, self.spool,
                         lambda: {"model_id": "digits", "model_version": 1,
                                  "profile": "x86-dev"}, state_dir=d)
        self.seq = 0
        self.topic = self.topics.act(device)
        self.update_done: float | None = None
        self.update_error: str | None = None

    def send(self, payload: bytes) -> None:
        from agent.envelope import Envelope

        self.seq += 1
        env = Envelope(device=self.device, session=self.link.session, seq=self.seq,
                       timestamp=time.time(), model_version=1, boundary=1, payload=payload,
                       meta={"model": "digits"}).pack()
        if not self.link.publish_reliable(self.topic, env):
            raise RuntimeError(f"{self.device}: spool refused an envelope")


def _stream(devs: list[SimDevice], frames: list[bytes], rate_hz: float, duration: float,
            stop: threading.Event) -> None:
    """Every device sends at ``rate_hz``, phases spread so the load is even."""
    period = 1.0 / rate_hz
    n = len(devs)
    t0 = time.monotonic()
    k = 0
    while not stop.is_set():
        now = time.monotonic() - t0
        if now >= duration:
            return
        # the k-th send overall is due at (k / n) * period
        due = (k // n) * period + (k % n) * period / n
        if due > now:
            time.sleep(min(due - now, 0.01))
            continue
        devs[k % n].send(frames[k % len(frames)])
        k += 1


def _rollout(devs: list[SimDevice], work: Path, model_dir: Path, key_path: Path,
             pub_key: Path, port: int, timeout: float) -> dict[str, Any]:
    """A signed v2 of the digits student, pushed once; every device verifies and fetches."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.blobs import BlobCache, BlobFetcher
    from agent.signing import load_public_keys
    from agent.update_manifest import parse_signed
    from cloud_trainer.export import export_partition
    from cloud_trainer.keys import load_private_key, sign_manifest
    from cloud_trainer.publisher import BlobPublisher, make_update
    from cloud_trainer.train import trained_pair

    v2_dir = work / "model-v2"
    part = export_partition(trained_pair("digits").student, v2_dir, model_id="digits",
                            model_version=2, profile_ort_version="1.16.3")
    manifest, files = make_update(FLEET, "digits", 2, {"": (part, v2_dir)})
    signed = sign_manifest(manifest, load_private_key(key_path))
    keys = load_public_keys([pub_key])
    inbox: queue.Queue[tuple[SimDevice, bytes]] = queue.Queue()
    for d in devs:
        d.link.subscribe(d.topics.manifest, 1,
                         lambda msg, d=d: inbox.put((d, bytes(msg.payload))))

    def worker() -> None:
        while True:
            try:
                d, payload = inbox.get(timeout=timeout)
            except queue.Empty:
                return
            if not payload:
                continue
            try:
                m = parse_signed(payload, keys, fleet=FLEET)
                variant = m.variant_for("x86-dev")
                fetcher = BlobFetcher(d.link, d.topics, d.device, BlobCache(d.dir / "cache"),
                                      first_request_after=2.0, request_interval=2.0)
                res = fetcher.fetch(variant, [b.index for b in variant.partition.blocks],
                                    timeout=timeout)
                if res.ok:
                    d.update_done = time.time()
                else:
                    d.update_error = f"{res.reason}: {res.detail}"
            except Exception as exc:  # counted, reported: one device must not stop the run
                d.update_error = f"{type(exc).__name__}: {exc}"
            finally:
                inbox.task_done()
            if all(x.update_done or x.update_error for x in devs):
                return

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    publisher = BlobPublisher(client, devs[0].topics, work / "publisher").start()
    workers = [threading.Thread(target=worker, daemon=True) for _ in range(min(32, len(devs)))]
    for w in workers:
        w.start()
    t0 = time.time()
    publisher.publish_update(signed, files)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(d.update_done or d.update_error
                                                  for d in devs):
        time.sleep(0.1)
    done = sorted(d.update_done - t0 for d in devs if d.update_done)
    errors = {d.device: d.update_error for d in devs if d.update_error}
    with contextlib.suppress(Exception):
        publisher.close()
    client.loop_stop()
    client.disconnect()
    return {"update_bytes": sum(b.size for b in part.blocks),
            "rollout_s_p50": round(float(np.percentile(done, 50)), 2) if done else None,
            "rollout_s_all": round(done[-1], 2) if len(done) == len(devs) else None,
            "updated": len(done), "update_failed": len(devs) - len(done),
            "update_errors": dict(list(errors.items())[:5])}


def run_fleet_bench(devices: int, *, duration_s: float = 20.0, rate_hz: float = 2.0,
                    codec: str = "uint8+lz4", update: bool = True,
                    drain_timeout_s: float = 120.0) -> dict[str, Any]:
    from broker.config import BrokerSettings
    from broker.launcher import Mosquitto, free_port
    from cloud_trainer.keys import generate_keypair

    raise_nofile(4 * devices + 256)
    with tempfile.TemporaryDirectory(prefix="knet-bench-fleet-") as tmp:
        work = Path(tmp)
        frames, model_dir = _payloads(work, codec)
        port = free_port()
        settings = BrokerSettings(port=port, allow_anonymous=True, persistence=True,
                                  persistence_location=work / "broker" / "data")
        key, pub = generate_keypair(work / "keys")
        cfg = _trainer_config(work, port, key)
        with Mosquitto(work / "broker", settings) as broker:
            trainer_log = open(work / "trainer.log", "wb")  # noqa: SIM115
            trainer = subprocess.Popen([sys.executable, "-m", "cloud_trainer.trainer_cli",
                                        "--config", str(cfg)], stdout=trainer_log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                return _measure(devices, work, port, broker.pid or 0, trainer, frames,
                                model_dir, key, pub, duration_s, rate_hz, codec, update,
                                drain_timeout_s)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(trainer.pid, signal.SIGTERM)
                try:
                    trainer.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(trainer.pid, signal.SIGKILL)
                    trainer.wait()
                trainer_log.close()


def _wait_trainer(work: Path, trainer: subprocess.Popen[bytes], timeout: float = 120) -> None:
    log_path = work / "trainer.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if trainer.poll() is not None:
            raise RuntimeError(f"the trainer exited: {log_path.read_text()[-2000:]}")
        if b"ingestor knet-ingest-bench-trainer connected" in log_path.read_bytes():
            time.sleep(1.0)  # its SUBSCRIBE follows the CONNACK
            return
        time.sleep(0.2)
    raise RuntimeError("the trainer's ingest did not connect")


def _measure(devices: int, work: Path, port: int, broker_pid: int,
             trainer: subprocess.Popen[bytes], frames: list[bytes], model_dir: Path,
             key: Path, pub: Path, duration_s: float, rate_hz: float, codec: str,
             update: bool, drain_timeout_s: float) -> dict[str, Any]:
    _wait_trainer(work, trainer)
    rss = PeakRss({"broker": broker_pid, "trainer": trainer.pid, "devices": os.getpid()})
    rss.start()
    ids = [f"sim-{i:04d}" for i in range(devices)]
    devs = [SimDevice(d, port, work) for d in ids]
    with contextlib.ExitStack() as stack:
        for d in devs:
            stack.enter_context(d.link)
        t_connect = time.monotonic()
        deadline = t_connect + max(60.0, devices * 0.2)  # one deadline for the whole fleet
        for d in devs:
            d.link.wait_connected(max(0.0, deadline - time.monotonic()))
        connect_s = time.monotonic() - t_connect
        unconnected = sum(not d.link.connected.is_set() for d in devs)
        log.warning("%d devices connected in %.1f s (%d not)", devices - unconnected,
                    connect_s, unconnected)
        stop = threading.Event()
        t_start = time.time()
        _stream(devs, frames, rate_hz, duration_s, stop)
        t_stream_end = time.time()
        sent = sum(d.seq for d in devs)
        db = work / "trainer" / "store" / "samples.sqlite3"
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            if all(len(d.spool) == 0 and d.link.inflight == 0 for d in devs) and \
                    _store_count(db) >= sent:
                break
            time.sleep(0.5)
        t_drained = time.time()
        rows = _store_rows(db)
        keys = {(d, s, q) for d, s, q, _t, _r in rows}
        expected = {(d.device, d.link.session, q) for d in devs for q in range(1, d.seq + 1)}
        delays = np.array([r - t for *_k, t, r in rows])
        received = np.array(sorted(r for *_k, r in rows))
        in_window = received[received <= t_stream_end] if len(received) else received
        result: dict[str, Any] = {
            "devices": devices, "rate_hz_per_device": rate_hz, "codec": codec,
            "payload_bytes": int(np.mean([len(f) for f in frames])),
            "duration_s": duration_s, "connect_s": round(connect_s, 2),
            "unconnected": unconnected, "sent": sent,
            "stored": len(keys & expected), "lost": len(expected - keys),
            "unexpected": len(keys - expected),
            "offered_msg_per_s": round(sent / max(1e-9, t_stream_end - t_start), 1),
            "ingest_msg_per_s": round(len(in_window) / max(1e-9, t_stream_end - t_start), 1),
            "drain_s": round(t_drained - t_stream_end, 2),
            "delay_ms_p50": round(float(np.percentile(delays, 50)) * 1e3, 1)
            if len(delays) else None,
            "delay_ms_p99": round(float(np.percentile(delays, 99)) * 1e3, 1)
            if len(delays) else None,
        }
        if update:
            result.update(_rollout(devs, work, model_dir, key, pub, port,
                                   timeout=max(60.0, devices * 0.5)))
        result["rss_mib"] = rss.stop()
    return result


def main_rows(results: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["devices"], r["offered_msg_per_s"], r["ingest_msg_per_s"], r["delay_ms_p50"],
             r["delay_ms_p99"], r.get("rollout_s_p50"), r.get("rollout_s_all"),
             f"{r.get('updated', '-')}/{r['devices']}", r["rss_mib"].get("broker"),
             r["rss_mib"].get("trainer"), r["rss_mib"].get("devices"), r["sent"], r["lost"])
            for r in results]


COLUMNS = ["devices", "offered msg/s", "ingested msg/s", "delay p50 ms", "delay p99 ms",
           "rollout p50 s", "rollout all s", "updated", "broker MiB", "trainer MiB",
           "devices MiB", "sent", "lost"]


def dumps(results: list[dict[str, Any]]) -> str:
    return json.dumps(results, indent=2)
