"""`knet bench fleet --devices N`: N simulated devices against one trainer, on loopback.

What is real: a private Mosquitto (the repo's broker config: persistence, queue limits);
the trainer is ``knet-trainer --config`` as its own process (ingest into the SQLite sample
store, fleet table, update publisher); the devices are sharded over worker processes
(``python -m bench.fleet --worker``, at most ``per_worker`` = 100 devices each) driven by
this process over their stdin/stdout. Why shards: paho's network loop uses ``select()``,
which fails (``ValueError: filedescriptor out of range``) for descriptors >= 1024, and paho
then treats the connection as lost and retries for ever; a device holds six
descriptors (measured: socket, paho's wake-up socket pair, SQLite spool files), so one
process hosted ~140 devices (measured: 138 of 200 connected, 0 of 500). Every simulated
device is an ``agent.mqtt.link.Link`` with its own on-disk ``Spool`` and MQTT v5 connection —
the agent's at-least-once publish path — sending real activation envelopes
(``agent.wire.envelope``) whose payloads are the digits student's block-1 outputs, computed once
by one shared onnxruntime session in this process and encoded with the agent's codec (the
workers get the encoded bytes). The update is a real signed manifest pushed by
``cloud_trainer.release.publisher.BlobPublisher`` (the trainer's publisher); each device verifies
it (``parse_signed`` with the fleet key) and downloads the changed blocks through
``agent.update.blobs.BlobFetcher`` into its own ``BlobCache`` (chunk and block sha256 checks).

What is simulated: no onnxruntime session per device (N sessions would not fit beside the
broker on two cores; inference cost is the agent benchmark's subject), and the update stops
after the verified download: the per-device self-test and swap build sessions and are
measured by ``knet bench update``. The broker runs without the ACL/password file (hashing N
passwords is set-up, not load).

Measured: ingest rate (stored samples per second over the streaming window), end-to-end
delay from the envelope's creation (just before ``publish_reliable``) to the row's
``received_at`` in the store (p50/p99), update rollout time (manifest published → last
device holds every verified block), peak RSS of Mosquitto, of the trainer and of the
workers (summed: the N devices), from ``/proc``; loss = envelopes created − distinct
envelopes stored (must be 0). A run is "held" only if every device connected, nothing was
lost or left in a spool, every device updated and no worker failed; every wait is bounded
and a failed run still returns what it measured.
"""

from __future__ import annotations

import base64
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
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner
    from agent.wire.codec import encode
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.training.train import eval_set
    from knet_lab.deployed import deployed_student

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
    from knet_lab.fleet import toml_text

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
    from cloud_trainer.ingest.store import _from_i64

    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT s.device, s.session, s.seq, s.timestamp, f.received_at "
                           "FROM samples s JOIN frames f ON f.id = s.frame").fetchall()
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
        from agent.mqtt.link import Link, LinkSettings
        from agent.mqtt.spool import Spool
        from agent.wire.topics import Topics

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
        from agent.wire.envelope import Envelope

        self.seq += 1
        env = Envelope(device=self.device, session=self.link.session, seq=self.seq,
                       timestamp=time.time(), model_version=1, boundary=1, payload=payload,
                       meta={"model": "digits"}).pack()
        if not self.link.publish_reliable(self.topic, env):
            raise RuntimeError(f"{self.device}: spool refused an envelope")


PER_WORKER = 100  # devices per worker process; see the module docstring (select() and fds)
MARK = "KNET-FLEET "  # prefix of a worker's event lines on its stdout


def _stream(devs: list[SimDevice], frames: list[bytes], rate_hz: float, duration: float,
            start_wall: float, phase_s: float) -> None:
    """Every device sends at ``rate_hz`` from ``start_wall`` (shared by all workers), for
    ``duration`` s; phases spread over the period, shifted by ``phase_s`` per worker, so the
    fleet's load is even."""
    period = 1.0 / rate_hz
    n = len(devs)
    time.sleep(max(0.0, start_wall - time.time()))
    t0 = time.monotonic()
    k = 0
    while True:
        now = time.monotonic() - t0
        if now >= duration:
            return
        # the k-th send of this worker is due at (k // n) * period + phase of device k % n
        due = (k // n) * period + (k % n) * period / n + phase_s
        if due > now:
            time.sleep(min(due - now, 0.01))
            continue
        devs[k % n].send(frames[k % len(frames)])
        k += 1


def _write_frames(path: Path, frames: list[bytes]) -> None:
    path.write_text(json.dumps([base64.b64encode(f).decode() for f in frames]))


def _read_frames(path: Path) -> list[bytes]:
    return [base64.b64decode(f) for f in json.loads(path.read_text())]


# -- worker process: one shard of the fleet ------------------------------------------------
def _emit(event: str, **data: Any) -> None:
    sys.stdout.write(MARK + json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def _command() -> dict[str, Any]:
    """The coordinator's next command; end of input means exit."""
    line = sys.stdin.readline()
    if not line:
        return {"cmd": "exit"}
    try:
        return dict(json.loads(line))
    except (ValueError, TypeError):
        log.error("unreadable command %r: exiting", line[:200])
        return {"cmd": "exit"}


def _drain(devs: list[SimDevice], timeout: float) -> int:
    """Wait until the connected devices' spools are empty; returns the records left."""
    live = [d for d in devs if d.link.connected.is_set()]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(d.spool) == 0 and d.link.inflight == 0 for d in live):
            break
        time.sleep(0.5)
    return sum(len(d.spool) for d in devs)


def _fetch_for(d: SimDevice, payload: bytes, keys: Any, deadline: float) -> None:
    """Verify one device's manifest and fetch its blocks; sets ``update_done`` or
    ``update_error``."""
    from agent.update.blobs import BlobCache, BlobFetcher
    from agent.update.update_manifest import parse_signed

    try:
        m = parse_signed(payload, keys, fleet=FLEET)
        variant = m.variant_for("x86-dev")
        fetcher = BlobFetcher(d.link, d.topics, d.device, BlobCache(d.dir / "cache"),
                              first_request_after=2.0, request_interval=2.0)
        res = fetcher.fetch(variant, [b.index for b in variant.partition.blocks],
                            timeout=max(1.0, deadline - time.monotonic()))
        if res.ok:
            d.update_done = time.time()
        else:
            d.update_error = f"{res.reason}: {res.detail}"
    except Exception as exc:  # counted, reported: one device must not stop the run
        d.update_error = f"{type(exc).__name__}: {exc}"


def _fetch_update(devs: list[SimDevice], pub_key: Path, timeout: float) -> None:
    """Each connected device verifies the (retained) signed manifest and fetches its blocks;
    returns when every device is done or failed, or after ``timeout``."""
    from agent.update.signing import load_public_keys

    keys = load_public_keys([pub_key])
    inbox: queue.Queue[tuple[SimDevice, bytes]] = queue.Queue()
    live = []
    for d in devs:
        if not d.link.connected.is_set():
            d.update_error = "not connected"
            continue
        live.append(d)
        d.link.subscribe(d.topics.manifest, 1,
                         lambda msg, d=d: inbox.put((d, bytes(msg.payload))))
    deadline = time.monotonic() + timeout

    def fetch_one() -> None:
        while time.monotonic() < deadline:
            try:
                d, payload = inbox.get(timeout=0.5)
            except queue.Empty:
                if all(x.update_done or x.update_error for x in live):
                    return
                continue
            if payload and not (d.update_done or d.update_error):
                _fetch_for(d, payload, keys, deadline)

    threads = [threading.Thread(target=fetch_one, daemon=True)
               for _ in range(min(32, max(1, len(live))))]
    for t in threads:
        t.start()
    _emit("subscribed")
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 1.0)
    for d in live:
        if not (d.update_done or d.update_error):
            d.update_error = f"no verified update within {timeout:.0f} s"


def worker_main(spec_path: Path) -> int:
    """One worker: its shard's devices connect, stream, drain and fetch the update on the
    coordinator's commands (stdin), reporting each phase as one event line (stdout)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(spec_path.read_text())
    raise_nofile(8 * len(spec["devices"]) + 256)
    frames = _read_frames(Path(spec["frames"]))
    work = Path(spec["work"])
    devs = [SimDevice(d, spec["port"], work) for d in spec["devices"]]
    with contextlib.ExitStack() as stack:
        for d in devs:
            stack.enter_context(d.link)
        t0 = time.monotonic()
        deadline = t0 + spec["connect_timeout_s"]
        for d in devs:
            d.link.wait_connected(max(0.0, deadline - time.monotonic()))
        _emit("connected", connected=sum(d.link.connected.is_set() for d in devs),
              connect_s=round(time.monotonic() - t0, 2))
        cmd = _command()
        if cmd["cmd"] == "stream":
            _stream(devs, frames, spec["rate_hz"], spec["duration_s"], cmd["start"],
                    spec["phase_s"])
            t_end = time.time()
            left = _drain(devs, spec["drain_timeout_s"])
            _emit("streamed", t_end=t_end, undrained=left,
                  expected=[[d.device, d.link.session, d.seq] for d in devs])
            cmd = _command()
        if cmd["cmd"] == "rollout":
            _fetch_update(devs, Path(spec["pub_key"]), float(cmd["timeout_s"]))
            _emit("updated", done={d.device: d.update_done for d in devs if d.update_done},
                  errors={d.device: d.update_error for d in devs if d.update_error})
            cmd = _command()
    return 0


# -- coordinator side ----------------------------------------------------------------------
class Worker:
    """A worker process and its event stream; every wait on it is bounded."""

    def __init__(self, index: int, spec_path: Path, log_path: Path) -> None:
        self.index = index
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", "--worker", str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            start_new_session=True)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.alive = True
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                try:
                    self.events.put(json.loads(line[len(MARK):]))
                except ValueError:
                    log.error("worker %d: unreadable event %r", self.index, line[:200])
        self.events.put(None)

    def send(self, **cmd: Any) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.alive = False

    def expect(self, event: str, deadline: float) -> dict[str, Any] | None:
        """The worker's next event if it is ``event`` and comes before ``deadline``."""
        if not self.alive:
            return None
        try:
            got = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            got = None
        if got is None or got.get("event") != event:
            self.alive = False
            return None
        return got

    def log_tail(self, n: int = 600) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def request_exit(self) -> None:
        """Ask the worker to close its links and exit (so all workers close in parallel)."""
        self.send(cmd="exit")
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def stop(self, timeout: float = 30.0) -> None:
        self.request_exit()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def _expect_all(workers: list[Worker], event: str, timeout: float,
                errors: list[str]) -> list[tuple[Worker, dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    got = []
    for w in workers:
        ev = w.expect(event, deadline)
        if ev is None:
            errors.append(f"worker {w.index}: no '{event}' within {timeout:.0f} s "
                          f"(exit code {w.proc.poll()}): {w.log_tail()}")
        else:
            got.append((w, ev))
    return got


def _signed_update(work: Path, key_path: Path) -> tuple[bytes, Any, int]:
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.release.keys import load_private_key, sign_manifest
    from cloud_trainer.release.publisher import make_update
    from cloud_trainer.training.train import trained_pair

    v2_dir = work / "model-v2"
    part = export_partition(trained_pair("digits").student, v2_dir, model_id="digits",
                            model_version=2, profile_ort_version="1.16.3")
    manifest, files = make_update(FLEET, "digits", 2, {"": (part, v2_dir)})
    return sign_manifest(manifest, load_private_key(key_path)), files, sum(
        b.size for b in part.blocks)


def _rollout(workers: list[Worker], devices: int, work: Path, key_path: Path, port: int,
             timeout: float, result: dict[str, Any]) -> None:
    """A signed v2 of the digits student, pushed once; every device verifies and fetches."""
    from agent.mqtt.client import make_client
    from agent.mqtt.endpoint import MqttEndpoint
    from agent.wire.topics import Topics
    from cloud_trainer.release.publisher import BlobPublisher

    signed, files, size = _signed_update(work, key_path)
    result["update_bytes"] = size
    errors: list[str] = result["errors"]
    client = make_client(MqttEndpoint(port=port), default_client_id="bench-publisher")
    publisher = BlobPublisher(client, Topics(FLEET), work / "publisher")
    client.start()
    if not client.wait_connected(30):
        raise ConnectionError(f"bench publisher: no broker on port {port}")
    publisher.start()
    try:
        for w in workers:
            w.send(cmd="rollout", timeout_s=timeout)
        ready = [w for w, _ev in _expect_all(workers, "subscribed", 60.0, errors)]
        t0 = time.time()
        publisher.publish_update(signed, files)
        reports = _expect_all(ready, "updated", timeout + 60.0, errors)
    finally:
        with contextlib.suppress(Exception):
            publisher.close()
        client.stop()
    done = sorted(t - t0 for _w, ev in reports for t in ev["done"].values())
    failed = {k: v for _w, ev in reports for k, v in ev["errors"].items()}
    result.update({
        "rollout_s_p50": round(float(np.percentile(done, 50)), 2) if done else None,
        "rollout_s_all": round(done[-1], 2) if len(done) == devices else None,
        "updated": len(done), "update_failed": devices - len(done),
        "update_errors": dict(list(failed.items())[:5])})


def _empty_result(devices: int, rate_hz: float, codec: str, duration_s: float,
                  workers: int) -> dict[str, Any]:
    """Every key the table reads, so a run that failed half-way still reports what it got."""
    return {"devices": devices, "workers": workers, "rate_hz_per_device": rate_hz,
            "codec": codec, "payload_bytes": None, "duration_s": duration_s,
            "connected": 0, "unconnected": devices, "connect_s": None, "sent": 0,
            "stored": 0, "lost": None, "unexpected": 0, "undrained": None,
            "offered_msg_per_s": None, "ingest_msg_per_s": None, "drain_s": None,
            "delay_ms_p50": None, "delay_ms_p99": None, "updated": 0,
            "update_failed": devices, "rollout_s_p50": None, "rollout_s_all": None,
            "rss_mib": {}, "errors": [], "held": False}


def run_fleet_bench(devices: int, *, duration_s: float = 20.0, rate_hz: float = 2.0,
                    codec: str = "uint8+lz4", update: bool = True,
                    drain_timeout_s: float = 120.0,
                    per_worker: int = PER_WORKER) -> dict[str, Any]:
    """One fleet run; never raises and never waits unboundedly: a failure (devices that did
    not connect, a worker that died) is reported in the result, next to what was measured."""
    from broker.config import BrokerSettings
    from broker.launcher import Mosquitto, free_port
    from cloud_trainer.release.keys import generate_keypair

    if devices < 1 or per_worker < 1:
        raise ValueError(f"devices ({devices}) and per_worker ({per_worker}) must be >= 1")
    n_workers = -(-devices // per_worker)
    result = _empty_result(devices, rate_hz, codec, duration_s, n_workers)
    try:
        raise_nofile(8 * per_worker + 4 * devices + 256)
        with tempfile.TemporaryDirectory(prefix="knet-bench-fleet-") as tmp:
            work = Path(tmp)
            frames, _model_dir = _payloads(work, codec)
            result["payload_bytes"] = int(np.mean([len(f) for f in frames]))
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
                    _measure(result, work, port, broker.pid or 0, trainer, frames, key, pub,
                             per_worker, update, drain_timeout_s)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(trainer.pid, signal.SIGTERM)
                    try:
                        trainer.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(trainer.pid, signal.SIGKILL)
                        trainer.wait()
                    trainer_log.close()
    except Exception as exc:  # reported in the table and the JSON, with what was measured
        log.exception("fleet run with %d devices failed", devices)
        result["errors"].append(f"{type(exc).__name__}: {exc}")
    result["held"] = bool(result["unconnected"] == 0 and result["lost"] == 0
                          and result["undrained"] == 0 and not result["errors"]
                          and (not update or result["update_failed"] == 0))
    return result


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


def _start_workers(work: Path, port: int, devices: int, per_worker: int, frames: list[bytes],
                   pub: Path, duration_s: float, rate_hz: float,
                   drain_timeout_s: float) -> list[Worker]:
    frames_path = work / "frames.json"
    _write_frames(frames_path, frames)
    ids = [f"sim-{i:04d}" for i in range(devices)]
    shards = [ids[i : i + per_worker] for i in range(0, devices, per_worker)]
    workers = []
    for w, shard in enumerate(shards):
        spec = {"port": port, "work": str(work), "devices": shard, "frames": str(frames_path),
                "pub_key": str(pub), "rate_hz": rate_hz, "duration_s": duration_s,
                "phase_s": w / (rate_hz * devices),  # the shards interleave in one period
                "connect_timeout_s": max(60.0, len(shard) * 0.5),
                "drain_timeout_s": drain_timeout_s}
        path = work / f"worker-{w}.json"
        path.write_text(json.dumps(spec))
        workers.append(Worker(w, path, work / f"worker-{w}.log"))
    return workers


def _measure(result: dict[str, Any], work: Path, port: int, broker_pid: int,
             trainer: subprocess.Popen[bytes], frames: list[bytes], key: Path, pub: Path,
             per_worker: int, update: bool, drain_timeout_s: float) -> None:
    """Fills ``result`` phase by phase, so a failure leaves what was measured before it."""
    devices, duration_s = result["devices"], result["duration_s"]
    _wait_trainer(work, trainer)
    workers = _start_workers(work, port, devices, per_worker, frames, pub, duration_s,
                             result["rate_hz_per_device"], drain_timeout_s)
    rss = PeakRss({"broker": broker_pid, "trainer": trainer.pid,
                   **{f"worker-{w.index}": w.proc.pid for w in workers}})
    rss.start()
    try:
        _run_phases(result, workers, work, port, key, update, drain_timeout_s)
    finally:
        for w in workers:
            w.request_exit()
        for w in workers:
            w.stop()
        peaks = rss.stop()
        wk = [v for k, v in peaks.items() if k.startswith("worker-")]
        result["rss_mib"] = {"broker": peaks.get("broker"), "trainer": peaks.get("trainer"),
                             "devices": round(sum(wk), 1) if wk else None,
                             "worker_max": max(wk) if wk else None}


def _run_phases(result: dict[str, Any], workers: list[Worker], work: Path, port: int,
                key: Path, update: bool, drain_timeout_s: float) -> None:
    devices, duration_s = result["devices"], result["duration_s"]
    errors: list[str] = result["errors"]
    conn = _expect_all(workers, "connected", max(60.0, per_shard(workers, devices) * 0.5)
                       + 120.0, errors)
    result["connected"] = sum(ev["connected"] for _w, ev in conn)
    result["unconnected"] = devices - result["connected"]
    result["connect_s"] = max((ev["connect_s"] for _w, ev in conn), default=None)
    log.warning("%d of %d devices connected in %s s over %d workers", result["connected"],
                devices, result["connect_s"], len(workers))
    if result["unconnected"]:
        errors.append(f"{result['unconnected']} of {devices} devices did not connect")
    live = [w for w, _ev in conn]
    t_start = time.time() + 1.0
    for w in live:
        w.send(cmd="stream", start=t_start)
    streamed = _expect_all(live, "streamed", 1.0 + duration_s + drain_timeout_s + 60.0, errors)
    t_stream_end = max((ev["t_end"] for _w, ev in streamed), default=time.time())
    expected = {(d, s, q) for _w, ev in streamed for d, s, n in ev["expected"]
                for q in range(1, n + 1)}
    sent = len(expected)
    result["sent"] = sent
    result["undrained"] = sum(ev["undrained"] for _w, ev in streamed)
    db = work / "trainer" / "store" / "samples.sqlite3"
    deadline = time.monotonic() + drain_timeout_s
    while time.monotonic() < deadline and _store_count(db) < sent:
        time.sleep(0.5)
    t_drained = time.time()
    rows = _store_rows(db)
    keys = {(d, s, q) for d, s, q, _t, _r in rows}
    delays = np.array([r - t for *_k, t, r in rows])
    received = np.array(sorted(r for *_k, r in rows))
    in_window = received[received <= t_stream_end] if len(received) else received
    span = max(1e-9, t_stream_end - t_start)
    result.update({
        "stored": len(keys & expected), "lost": len(expected - keys),
        "unexpected": len(keys - expected),
        "offered_msg_per_s": round(sent / span, 1),
        "ingest_msg_per_s": round(len(in_window) / span, 1),
        "drain_s": round(t_drained - t_stream_end, 2),
        "delay_ms_p50": round(float(np.percentile(delays, 50)) * 1e3, 1)
        if len(delays) else None,
        "delay_ms_p99": round(float(np.percentile(delays, 99)) * 1e3, 1)
        if len(delays) else None})
    if update:
        _rollout([w for w, _ev in streamed], devices, work, key, port,
                 max(60.0, devices * 0.5), result)


def per_shard(workers: list[Worker], devices: int) -> int:
    return -(-devices // max(1, len(workers)))


def main_rows(results: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["devices"], r.get("workers"), f"{r.get('connected', '-')}/{r['devices']}",
             r["offered_msg_per_s"], r["ingest_msg_per_s"], r["delay_ms_p50"],
             r["delay_ms_p99"], r.get("rollout_s_p50"), r.get("rollout_s_all"),
             f"{r.get('updated', '-')}/{r['devices']}", r["rss_mib"].get("broker"),
             r["rss_mib"].get("trainer"), r["rss_mib"].get("devices"), r["sent"], r["lost"],
             "yes" if r.get("held") else "NO")
            for r in results]


COLUMNS = ["devices", "workers", "connected", "offered msg/s", "ingested msg/s",
           "delay p50 ms", "delay p99 ms", "rollout p50 s", "rollout all s", "updated",
           "broker MiB", "trainer MiB", "devices MiB", "sent", "lost", "held"]


def dumps(results: list[dict[str, Any]]) -> str:
    return json.dumps(results, indent=2)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m bench.fleet --worker SPEC.json (started by knet bench fleet)")
    sys.exit(worker_main(Path(sys.argv[2])))
