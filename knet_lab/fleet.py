"""A whole fleet on one machine, as an operator would run it: what `knet demo` and the fault
tests drive.

Everything goes through the documented commands and config files: the broker directory is
provisioned with per-account credentials and ACLs (``broker/provision.py``, what
``knet broker provision`` does) and served by ``knet broker run``; the trainer is
``knet-trainer --config trainer.toml``; each device is ``knet-agent --config <device>.toml``
with its own firmware profile, credentials, state directory and uplink policy. Every
process runs in its own session (process group), so stopping one stops its children too and
nothing outlives the lab: ``Lab.close`` (also on Ctrl-C) sends SIGTERM to every group, then
SIGKILL to what is left, and ``pids.json`` names every process started, for a check
afterwards.

Two kinds of in-process clients stand in for the world around the fleet:

* a ``Camera`` per device feeds frames onto the device's ``input`` topic with the device's
  own credentials (the ACL lets nobody else write there), the label in a user property;
* the ``Console`` (its own provisioned account, read-only by use) watches what an operator
  watches: ``stats``, ``result``, ``update``, ``birth``, ``state``, the activations on the
  wire (to count bytes and, later, losses), the trainer's retained state and the update
  chunks the trainer pushes.

The fleet's first deployment is the block-wise distilled student (``knet_lab.deployed``),
registered as version 1 in the trainer's registry before the trainer starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from agent.mqtt.client import make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.wire.codec import encode
from agent.wire.control import Birth, DeviceState, Stats, TrainerState
from agent.wire.envelope import BatchEnvelope, EnvelopeError, unpack_any
from agent.wire.topics import TopicKind, Topics
from agent.wire.update_report import UpdateReport
from broker.launcher import free_port, wait_for_port

log = logging.getLogger(__name__)

FLEET = "demo"
TRAINER_ID = "trainer-1"
CONSOLE_ID = "console"


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: its id, firmware profile and uplink policy."""

    device: str
    profile: str
    uplink: dict[str, Any]


# Every device uplinks raw inputs (boundary 0): the trainer can then supervise every block,
# including block 1 (without boundary 0 it stays frozen). The policies differ in rate, codec
# and the extra boundaries they send.
DEVICES = (
    DeviceSpec("pi4-kitchen", "rpi4", {"every_n": 1, "boundaries": [0],
                                       "codec": "uint8+lz4"}),
    DeviceSpec("nano-door", "jetson-nano", {"every_n": 2, "boundaries": [0, 2],
                                            "codec": "uint8+lz4"}),
    DeviceSpec("x86-lab", "x86-dev", {"every_n": 3, "hard_threshold": 0.9, "boundaries": [0],
                                      "codec": "zfp:precision=12"}),
)


def device_specs(n: int) -> list[DeviceSpec]:
    """``n`` devices: the three above, then more of the same kinds with numbered ids."""
    out = []
    for i in range(n):
        base = DEVICES[i % len(DEVICES)]
        suffix = "" if i < len(DEVICES) else f"-{i // len(DEVICES) + 1}"
        out.append(DeviceSpec(base.device + suffix, base.profile, dict(base.uplink)))
    return out


# -- TOML -----------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(i) for i in v) + "]"
    if isinstance(v, float | int):
        return repr(v)
    raise TypeError(f"no TOML form for {type(v).__name__}")


def toml_text(doc: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer: scalars and lists, nested tables, arrays of tables."""
    lines: list[str] = []
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict) and not (
        isinstance(v, list) and v and isinstance(v[0], dict))}
    for k, v in scalars.items():
        if v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in doc.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            lines += ["", f"[{name}]", toml_text(v, name + ".")]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += ["", f"[[{name}]]", toml_text(item, name + ".")]
    return "\n".join(line for line in lines if line is not None).strip("\n") + "\n"


# -- processes ------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, env: dict[str, str] | None = None) -> Proc:
        fh = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.popen = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=env)
        finally:
            fh.close()
        log.info("started %s (pid %d): %s", self.name, self.popen.pid, " ".join(self.argv))
        return self

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the child made it: start_new_session)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the group; returns the exit status."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: SIGKILL", self.name, timeout)
            self.kill()
            return self.popen.returncode

    def kill(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def _cli(module: str) -> list[str]:
    return [sys.executable, "-m", module]


# -- the console ----------------------------------------------------------------------------
def lab_endpoint(host: str, port: int, username: str, password: str) -> MqttEndpoint:
    """A lab client's endpoint: quick reconnects, as the fault tests restart the broker."""
    return MqttEndpoint(host=host, port=port, username=username, password=SecretStr(password),
                        reconnect_min_delay=0.2, reconnect_max_delay=2.0)


@dataclass
class DeviceView:
    """What the console knows about one device."""

    state: str = "-"
    version: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    results: list[tuple[int, int | None, int | None, float]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    act_keys: set[tuple[int, int]] = field(default_factory=set)
    act_bytes: int = 0
    act_duplicates: int = 0
    act_bad: int = 0


class Console:
    """An operator's view of the fleet over MQTT (module doc)."""

    def __init__(self, host: str, port: int, password: str, topics: Topics,
                 trainer_id: str = TRAINER_ID) -> None:
        self.topics, self.trainer_id = topics, trainer_id
        self.devices: dict[str, DeviceView] = {}
        self.trainer: dict[str, Any] = {}
        self.blob_bytes = 0
        self.blob_chunks = 0
        self.manifests: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        c = make_client(lab_endpoint(host, port, CONSOLE_ID, password),
                        default_client_id=f"{CONSOLE_ID}-{os.getpid()}")
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self.client = c
        self.connected = c.connected
        c.start()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any,
                    _p: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("console refused: %s", reason)
            return
        t = self.topics
        client.subscribe([(t.all_devices(leaf), 1) for leaf in
                          ("state", "birth", "stats", "update", "result", "act")]
                         + [(t.trainer_state(self.trainer_id), 1), (t.manifest, 1),
                            (f"{t.fleet_root}/model/blob/#", 1)])

    def view(self, device: str) -> DeviceView:
        return self.devices.setdefault(device, DeviceView())

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg)
        except Exception as exc:  # a malformed message must not stop the console
            log.debug("console ignored %s: %s", msg.topic, exc)

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        topic = self.topics.parse(msg.topic)
        kind, payload = topic.kind, bytes(msg.payload)
        with self.lock:
            if kind is TopicKind.TRAINER_STATE:
                if topic.trainer == self.trainer_id:
                    self.trainer = TrainerState.parse(payload).as_dict() if payload else {}
            elif kind is TopicKind.MANIFEST:
                if payload:
                    self.manifests.append((time.time(), json.loads(payload)))
            elif kind is TopicKind.BLOB:
                self.blob_bytes += len(payload)
                self.blob_chunks += 1
            elif topic.device is not None:
                self._device_message(kind, self.view(topic.device), payload)

    def _device_message(self, kind: TopicKind, v: DeviceView, payload: bytes) -> None:
        """One device's message, routed by its topic's kind (the caller holds the lock)."""
        if kind is TopicKind.ACT:
            self._activation(v, payload)
        elif kind is TopicKind.STATS:
            stats = Stats.parse(payload)
            v.stats = stats.as_dict()
            if stats.model_version is not None:
                v.version = stats.model_version
        elif kind is TopicKind.RESULT:
            r = json.loads(payload)
            v.results.append((int(r["index"]), r.get("prediction"), r.get("label"),
                              time.time()))
        elif kind is TopicKind.UPDATE:
            rep = UpdateReport.parse(payload).model_dump(mode="json")
            rep["received"] = time.time()
            v.reports.append(rep)
            if rep["status"] == "applied":
                v.version = int(rep["version"])
        elif kind is TopicKind.BIRTH and payload:
            v.version = Birth.parse(payload).model_version or v.version
        elif kind is TopicKind.STATE and payload:
            v.state = DeviceState.parse(payload).state

    @staticmethod
    def _activation(v: DeviceView, payload: bytes) -> None:
        try:
            env = unpack_any(payload)
        except EnvelopeError:
            v.act_bad += 1
            return
        seqs = ([int(s) for s in env.samples["seq"]] if isinstance(env, BatchEnvelope)
                else [env.seq])
        for seq in seqs:  # a batch envelope counts each of its samples
            key = (env.session, seq)
            if key in v.act_keys:
                v.act_duplicates += 1
                continue
            v.act_keys.add(key)
        v.act_bytes += len(payload)

    def applied(self, device: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.view(device).reports if r.get("status") == "applied"]

    def close(self) -> None:
        self.client.stop()


# -- the camera -----------------------------------------------------------------------------
class Camera:
    """Publishes frames to one device's input topic with that device's credentials.

    ``sent`` records every frame as (phase, label, version the console saw at send time,
    time): the agent numbers its MQTT frames in arrival order, which for one QoS 1 publisher
    is send order, so a result's ``index`` is the position in ``sent``.
    """

    def __init__(self, device: str, host: str, port: int, password: str,
                 topics: Topics) -> None:
        self.device = device
        self.topic = topics.input(device)
        self.sent: list[tuple[str, int, int | None, float]] = []
        self.lock = threading.Lock()
        # Its own account and session (the broker binds a session to its username).
        c = make_client(lab_endpoint(host, port, device, password).for_connection("camera"),
                        default_client_id=f"{device}-camera")
        c.max_queued_messages_set(0)
        self.client = c
        c.start()

    def send(self, x: np.ndarray, label: int, phase: str, version: int | None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("label", str(int(label)))]
        payload = encode(np.ascontiguousarray(x[None], dtype=np.float32), "raw")
        with self.lock:
            self.sent.append((phase, int(label), version, time.time()))
            self.client.publish(self.topic, payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.stop()


# -- the lab --------------------------------------------------------------------------------
@dataclass
class LabSettings:
    root: Path
    model: str = "digits"
    devices: Sequence[DeviceSpec] = DEVICES
    seed: int = 0
    interval_s: float = 20.0  # the retraining job's schedule
    min_new_samples: int = 300
    max_samples: int = 1200  # newest samples per run: bounds a run's training time
    epochs: int = 8  # x up to max_samples/64 steps: ~150 steps, enough from the KT student
    batch_norm: str = "train"  # the jobs' [training] batch_norm
    balance: str = "newest"  # [training] balance: "per_device" when cameras see different scenes
    per_device_gate: bool = False  # [gate] per_device
    min_improvement: float = 2.0  # points a candidate must gain on the holdout to be pushed
    success_timeout_s: float = 90.0
    stats_interval_s: float = 1.0
    console_port: int | None = None  # the trainer's web console ([console]); None: off
    trainer_extra: dict[str, Any] = field(default_factory=dict)
    agent_extra: dict[str, dict[str, Any]] = field(default_factory=dict)


class Lab:
    """Provision, start, watch and stop a fleet (module doc). Use as a context manager."""

    def __init__(self, settings: LabSettings) -> None:
        self.s = settings
        self.root = settings.root.resolve()
        self.topics = Topics(FLEET)
        self.port = free_port()
        self.procs: dict[str, Proc] = {}
        self.passwords: dict[str, str] = {}
        self.console: Console | None = None
        self.cameras: dict[str, Camera] = {}
        self.models_dir = self.root / "models"
        self.broker_dir = self.root / "broker"
        self.trainer_dir = self.root / "trainer"
        self.trainer_toml = self.root / "trainer.toml"
        self.console_token_file = self.root / "console.token"  # the demo operator's token
        self._pids: list[dict[str, Any]] = []
        self._mosquitto: set[int] = set()

    # --- preparation
    def prepare(self, progress: Callable[[str], None] = lambda _m: None) -> None:
        """Credentials, keys, the deployed student's export per profile, all config files."""
        from broker.provision import provision_device, provision_trainer
        from cloud_trainer.release.keys import generate_keypair

        self.root.mkdir(parents=True, exist_ok=True)
        progress("provisioning the broker: per-device credentials and ACLs")
        for spec in self.s.devices:
            creds = provision_device(self.broker_dir, spec.device, FLEET, port=self.port,
                                     reload=False, connections=["camera"])
            self.passwords[spec.device] = str(creds.password)
        for account in (TRAINER_ID, CONSOLE_ID):
            creds = provision_trainer(self.broker_dir, account, [FLEET], port=self.port,
                                      reload=False)
            self.passwords[account] = str(creds.password)
        keys = self.root / "keys"
        if not (keys / "knet-update.key").exists():
            generate_keypair(keys)
        self.private_key, self.public_key = keys / "knet-update.key", keys / "knet-update.pub"
        progress("exporting the deployed student for every firmware profile")
        self._export()
        self._seed_registry()
        self._write_trainer_config()
        for spec in self.s.devices:
            self._write_agent_config(spec)

    def _export(self) -> None:
        """Version 1 for every profile, through the trainer's own export cache.

        The devices get byte-for-byte the block files the trainer will regard as what they
        hold (it skips pushing those), and the trainer does not export version 1 again at
        its first retraining run (with the dynamo exporter that is seconds per block).
        """
        from agent.infer.manifest import PartitionManifest
        from agent.infer.profiles import load_profile
        from cloud_trainer.models.export import target_for_ort
        from cloud_trainer.training.retrain import ExportCache
        from cloud_trainer.training.train import trained_pair
        from knet_lab.deployed import deployed_student

        self.pair = trained_pair(self.s.model, seed=self.s.seed)
        self.student = deployed_student(self.s.model, self.s.seed, pair=self.pair)
        cache = ExportCache(self.trainer_dir / "exports")
        self.manifests: dict[str, PartitionManifest] = {}
        for profile in sorted({d.profile for d in self.s.devices}):
            ort = load_profile(profile).onnxruntime
            _part, src = cache.partition(self.student, self.s.model, 1, target_for_ort(ort),
                                         ort)
            out = self.models_dir / profile
            if not (out / "manifest.json").exists():
                shutil.copytree(src, out, dirs_exist_ok=True)
            self.manifests[profile] = PartitionManifest.load(out / "manifest.json")

    def _seed_registry(self) -> None:
        """Version 1 = the deployed student, before the trainer would register the zoo one."""
        from cloud_trainer.release.registry import Registry

        reg = Registry(self.trainer_dir / "registry")
        if reg.deployed(self.s.model) is None and not reg.versions(self.s.model):
            states = [self.student.block(i).state_dict()
                      for i in range(1, self.student.num_blocks + 1)]
            reg.add_version(self.s.model, states, status="pushed",
                            reason="initial deployment: the block-wise distilled student",
                            info={"initial": True, "zoo": self.s.model, "seed": self.s.seed,
                                  "deployed": "knet_lab.deployed"})

    def password_file(self, account: str) -> Path:
        return self.broker_dir / "credentials" / account / "mqtt.password"

    def _write_trainer_config(self) -> None:
        s = self.s
        doc: dict[str, Any] = {
            "trainer": {"id": TRAINER_ID, "fleet": FLEET, "state_dir": self.trainer_dir,
                        "signing_key_file": self.private_key, "log_format": "json"},
            "mqtt": {"host": "127.0.0.1", "port": self.port, "username": TRAINER_ID,
                     "password_file": self.password_file(TRAINER_ID),
                     "connection_accounts": True},
            "models": {s.model: {"zoo": s.model, "seed": s.seed,
                                 "profiles": sorted({d.profile for d in s.devices})}},
            # One trainer on Mosquitto: a plain subscription survives broker restarts, a
            # shared one does not (cloud_trainer/ingest/ingestor.py, docs/deploy.md).
            "ingest": {"enabled": True, "shared": False},
            "jobs": [{
                "id": f"{s.model}-retrain", "model": s.model, "interval_s": s.interval_s,
                "min_new_samples": s.min_new_samples, "misfire_grace_s": 60,
                "boundaries": [0],
                "training": {"epochs": s.epochs, "lr": 0.003, "batch_size": 64,
                             "batch_norm": s.batch_norm,
                             "raw_input_mode": "student+boundary",
                             "max_samples": self.s.max_samples, "balance": s.balance},
                "gate": {"metric": "teacher_agreement", "margin": 0.5,
                         "min_improvement": s.min_improvement, "holdout_fraction": 0.2,
                         "per_device": s.per_device_gate},
            }],
            "rollout": {"enabled": True, "canary_fraction": 0.34,
                        "success_timeout_s": s.success_timeout_s,
                        "required_success_ratio": 1.0},
        }
        if s.console_port is not None:
            doc["console"] = self._console_section(s.console_port)
        for section, values in s.trainer_extra.items():
            if isinstance(doc.get(section), dict):
                doc[section].update(values)
            else:
                doc[section] = values
        self.trainer_toml.write_text(toml_text(doc))

    def _console_section(self, port: int) -> dict[str, Any]:
        """Loopback, readable without a login; one operator token for the actions, kept
        in ``console.token`` (0600) and stored hashed in ``console.tokens``."""
        import secrets

        from cloud_trainer.serve.console.auth import token_line

        token = secrets.token_urlsafe(24)
        tokens = self.root / "console.tokens"
        tokens.write_text(token_line("operator", "demo", token) + "\n")
        fd = os.open(self.console_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return {"enabled": True, "bind": "127.0.0.1", "port": port, "tokens_file": tokens,
                "read_anonymous": True}

    @property
    def console_url(self) -> str | None:
        port = self.s.console_port
        return None if port is None else f"http://127.0.0.1:{port}"

    def agent_toml(self, device: str) -> Path:
        return self.root / "agents" / f"{device}.toml"

    def _write_agent_config(self, spec: DeviceSpec) -> None:
        state = self.root / "agents" / spec.device
        uplink = {**spec.uplink, "allow_raw_upload": 0 in spec.uplink["boundaries"]}
        doc: dict[str, Any] = {
            "device": {"id": spec.device, "fleet": FLEET, "state_dir": state / "state",
                       "cache_dir": state / "cache"},
            "model": {"manifest": self.models_dir / spec.profile / "manifest.json",
                      "profile": spec.profile},
            "mqtt": {"host": "127.0.0.1", "port": self.port, "username": spec.device,
                     "password_file": self.password_file(spec.device),
                     "reconnect_min_delay": 0.2, "reconnect_max_delay": 2.0},
            "source": {"kind": "mqtt", "queue_size": 256},
            "uplink": uplink,
            "metrics": {"stats_interval_s": self.s.stats_interval_s, "publish_results": True},
            "update": {"enabled": True, "public_keys": [self.public_key],
                       "first_request_after_s": 1.0, "request_interval_s": 1.0,
                       "health": {"watch_s": 5.0}},
        }
        for section, values in self.s.agent_extra.items():
            if section == "source" or section not in doc:  # a source is replaced whole
                doc[section] = dict(values)
            else:
                doc[section].update(values)
        path = self.agent_toml(spec.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toml_text(doc))

    # --- processes
    def _record(self, proc: Proc) -> None:
        self._pids.append({"name": proc.name, "pid": proc.pid, "started": time.time()})
        (self.root / "pids.json").write_text(json.dumps(self._pids, indent=1) + "\n")

    def _start(self, name: str, argv: list[str]) -> Proc:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        proc = Proc(name, argv, logs / f"{name}.log").start()
        self.procs[name] = proc
        self._record(proc)
        return proc

    def start_broker(self, timeout: float = 15.0) -> Proc:
        proc = self._start("broker", [*_cli("knet_cli.main"), "broker", "run", "--dir",
                                      str(self.broker_dir), "--port", str(self.port)])
        if not wait_for_port("127.0.0.1", self.port, timeout):
            raise RuntimeError(f"the broker did not listen on port {self.port}; see "
                               f"{proc.log_path}")
        pid = self.mosquitto_pid(timeout=5.0)
        if pid is not None:  # its own session: `knet broker run` stops it by PID
            self._pids.append({"name": "mosquitto", "pid": pid, "started": time.time()})
            self._mosquitto.add(pid)
        return proc

    def mosquitto_pid(self, timeout: float = 0.0) -> int | None:
        """The PID ``knet broker run`` wrote for its Mosquitto (None if not running)."""
        pid_file = self.broker_dir / "broker" / "mosquitto.pid"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text().strip())
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def kill_broker(self) -> None:
        """A broker crash: SIGKILL Mosquitto itself; its wrapper then exits."""
        pid = self.mosquitto_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self.procs.get("broker")
        if proc is not None and proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(15)
            proc.kill()

    def start_trainer(self) -> Proc:
        return self._start("trainer", [*_cli("cloud_trainer.trainer_cli"), "--config",
                                       str(self.trainer_toml)])

    def start_agent(self, device: str) -> Proc:
        return self._start(device, [*_cli("agent.cli"), "--config",
                                    str(self.agent_toml(device))])

    def start_clients(self) -> None:
        if self.console is None:
            self.console = Console("127.0.0.1", self.port, self.passwords[CONSOLE_ID],
                                   self.topics)
        for spec in self.s.devices:
            self.cameras[spec.device] = Camera(spec.device, "127.0.0.1", self.port,
                                               self.passwords[spec.device], self.topics)

    def start(self, timeout: float = 90.0) -> None:
        """Broker, console, trainer (until its ingest session exists), agents, cameras.

        The order matters on a fresh broker: activations published before the trainer's
        ingest session first subscribed have no subscriber and are dropped by the broker;
        from then on its persistent session queues them across trainer restarts.
        """
        self.start_broker()
        self.console = Console("127.0.0.1", self.port, self.passwords[CONSOLE_ID], self.topics)
        self.start_trainer()
        self.wait_ingest(timeout)
        for spec in self.s.devices:
            self.start_agent(spec.device)
        self.start_clients()

    def wait_ingest(self, timeout: float = 90.0) -> None:
        """Until the trainer is online and its ingestor's subscription was granted (the
        ingestor logs ``subscribed`` on the SUBACK): activations sent from then on are
        queued for it, whatever happens to the trainer later."""
        log_file = self.procs["trainer"].log_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                assert self.console is not None
                with self.console.lock:
                    online = self.console.trainer.get("state") == "online"
                if online and any("ingestor knet-ingest-" in line and " subscribed" in line
                                  for line in log_file.read_text(errors="replace").splitlines()):
                    return
            if not self.procs["trainer"].running():
                raise RuntimeError(f"the trainer exited; see {self.procs['trainer'].log_path}")
            time.sleep(0.2)
        raise RuntimeError("the trainer's ingest did not connect in time")

    def wait_online(self, timeout: float = 90.0) -> bool:
        """Every agent announced ``online`` and the trainer its state."""
        assert self.console is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.console.lock:
                ok = all(self.console.view(d.device).state == "online"
                         for d in self.s.devices) and \
                    self.console.trainer.get("state") == "online"
            if ok:
                return True
            dead = [p.name for p in self.procs.values() if not p.running()]
            if dead:
                raise RuntimeError(f"process(es) exited during start-up: {dead}; logs in "
                                   f"{self.root / 'logs'}")
            time.sleep(0.2)
        return False

    def close(self) -> dict[str, int | None]:
        """Stop everything this lab started: agents, trainer, broker (SIGTERM, then KILL)."""
        for c in self.cameras.values():
            with contextlib.suppress(Exception):
                c.close()
        codes: dict[str, int | None] = {}
        order = [n for n in self.procs if n not in ("trainer", "broker")] + [
            n for n in ("trainer", "broker") if n in self.procs]
        for name in order:
            codes[name] = self.procs[name].stop()
        for pid in pids_alive(self._mosquitto):  # orphaned if its wrapper was SIGKILLed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.console is not None:
            with contextlib.suppress(Exception):
                self.console.close()
        return codes

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- the trainer's store, read after the trainer stopped
    def stored_keys(self) -> set[tuple[str, int, int]]:
        from cloud_trainer.ingest.store import SQLiteSampleStore

        with SQLiteSampleStore(self.trainer_dir / "store") as store:
            return store.sample_keys()


def pids_alive(pids: Iterable[int]) -> list[int]:
    """Which of ``pids`` still exist (zombies of other parents count as gone)."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(pid)
    return alive
