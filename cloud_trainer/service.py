"""The trainer daemon (`knet-trainer --config trainer.toml`): everything tied together.

One process holds:

* one MQTT v5 connection for the trainer itself: the retained ``trainer_state`` (``online``
  with a summary of runs; the Will says ``offline``), the fleet's ``state``/``birth`` (the
  fleet table) and ``update`` reports (the rollout's evidence), and the ``BlobPublisher``
  that publishes signed updates and serves chunk re-requests;
* the ``Ingestor`` (its own persistent session, shared subscription) into the sample store;
* optionally the ``SplitServer`` (teacher blocks k+1..N);
* the ``JobScheduler`` (cloud_trainer/scheduler.py: APScheduler 3.x on an
  ``SQLAlchemyJobStore`` in the state directory or the database).

Each part with threads or connections of its own is a ``Subsystem``
(cloud_trainer/subsystem.py): started once, stopped in reverse order.

Exactly one scheduler per job store: the process takes an exclusive ``flock`` on
``scheduler.lock`` before touching the store and refuses to start when another holds it
(``SchedulerLocked``). The lock is held for the process's life, so the kernel releases it
even after SIGKILL. ``knet-trainer jobs run-now`` either asks the running daemon (a request
file + SIGUSR1; the daemon moves the job's next run time to now) or, when no daemon holds
the lock, takes the lock and runs the job in-process without any scheduler.

With ``[database]`` (PostgreSQL) the store, registry, run log and job store are shared by
every replica, the schema revision is checked before anything starts, and the scheduler
runs only in the replica holding the fleet's advisory lock (``storage/leader.py``); the
others ingest, serve and stand by, and one of them takes over within about a second when
the leader dies.

The job function is module-level (APScheduler stores a reference); the service is handed
to each run by the scheduler's executor, never found through a global (scheduler.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.mqtt.client import KnetClient, Will, make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.update.signing import SigningError
from agent.update.update_manifest import SignedManifest
from agent.wire.control import ControlMessageError, RunSummary, TrainerState
from agent.wire.topics import TopicError, TopicKind
from agent.wire.update_report import UpdateReport, UpdateReportError
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.guard import RateLimitedLog, ThreadDeathWatch, guard_callback
from cloud_trainer.ingest.fleet import FleetTable
from cloud_trainer.ingest.store import SampleStore, SQLiteSampleStore, StoreLimits
from cloud_trainer.release.keys import load_private_key, secret_share_group
from cloud_trainer.release.publisher import BlobPublisher
from cloud_trainer.release.registry import Registry
from cloud_trainer.release.runs import Run, RunLog

# scheduled_run stays importable from here: job stores written before scheduler.py
# existed reference it as cloud_trainer.service:scheduled_run.
from cloud_trainer.scheduler import JobScheduler, make_trigger, scheduled_run
from cloud_trainer.subsystem import Managed, Subsystems
from cloud_trainer.trainer_config import TrainerConfig
from cloud_trainer.training.retrain import (
    ModelRuntime,
    ProgressSink,
    Retrainer,
    ensure_initial_version,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from cloud_trainer.ingest.ingestor import Ingestor
    from cloud_trainer.metrics import MetricsEndpoint
    from cloud_trainer.plan.adaptive import CutAdapter
    from cloud_trainer.serve.console.server import ConsoleServer
    from cloud_trainer.serve.split import SplitServer
    from cloud_trainer.storage.leader import LeaderLock

log = logging.getLogger(__name__)

STATE_INTERVAL_S = 10.0  # the retained trainer state is refreshed this often (and per run)


class SchedulerLocked(KnetTrainerError, RuntimeError):
    """Another knet-trainer process owns this state directory's job store."""


# -- the lock -------------------------------------------------------------------------------
class StateLock:
    """An exclusive, non-blocking ``flock`` on ``scheduler.lock`` holding the owner's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, purpose: str) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SchedulerLocked(
                f"{self.path} is held by {holder(self.path) or 'another process'}: exactly "
                "one scheduler may use this job store; stop it first, or ask it with "
                "`knet-trainer jobs run-now`") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "purpose": purpose,
                                 "since": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def holder(path: Path) -> str | None:
    """Who holds the lock, as text ("pid 123 (daemon)"), from the lock file; None if free."""
    info = lock_info(path)
    return None if info is None else f"pid {info['pid']} ({info.get('purpose', '?')})"


def lock_info(path: Path) -> dict[str, Any] | None:
    """The holder's record when the lock is held right now, else None."""
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return dict(json.loads(Path(path).read_text() or "{}")) or {"pid": "?"}
            except ValueError:
                return {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- MQTT -----------------------------------------------------------------------------------
# The device topics the trainer's own connection reads, each routed by its kind.
DEVICE_KINDS = (TopicKind.STATE, TopicKind.BIRTH, TopicKind.UPDATE)


class _Channel:
    """The retrainer's way out: the BlobPublisher on the trainer's connection."""

    def __init__(self, client: mqtt.Client, publisher: BlobPublisher, manifest_topic: str,
                 fence: Callable[[], None] = lambda: None):
        self.client, self.publisher, self.topic = client, publisher, manifest_topic
        self.fence = fence  # raises FencedError when this replica's leadership is over

    def publish(self, signed: SignedManifest, files: Any, held: set[str]) -> None:
        self.fence()  # a deposed leader must not publish (storage/fence.py)
        self.publisher.publish_update(signed, files, held=sorted(held))

    def clear_manifest(self) -> None:
        self.client.publish(self.topic, b"", qos=1, retain=True).wait_for_publish(30)


class TrainerService:
    """The daemon's parts; ``oneshot`` (run-now without a daemon) skips ingest/scheduler."""

    def __init__(self, config: TrainerConfig, *, oneshot: bool = False,
                 interactive: bool | None = None) -> None:
        self.config = config
        self.oneshot = oneshot
        self.topics = config.topics
        self.stopping = threading.Event()
        self.fleet = FleetTable()
        self.lock = StateLock(config.lock_file)
        self.progress = ProgressSink(interactive)
        self._run_lock = threading.Lock()
        self._requests_event = threading.Event()
        self.started_at = time.time()
        # Set by start(), in this order; None before (and after a failed start).
        self.key: Ed25519PrivateKey | None = None
        self.engine: Engine | None = None  # SQLAlchemy engine on [database] (None: SQLite)
        self.registry: Registry | None = None
        self.runs: RunLog | None = None
        self.store: SampleStore | None = None
        self.models: dict[str, ModelRuntime] = {}
        self.client: KnetClient | None = None
        self.publisher: BlobPublisher | None = None
        self.retrainer: Retrainer | None = None
        # The subsystems (cloud_trainer/subsystem.py), each set when started.
        self.parts = Subsystems()
        self.ingestor: Ingestor | None = None  # [ingest]
        self.split: SplitServer | None = None  # [split]
        self.adapter: CutAdapter | None = None  # cloud_trainer/plan/adaptive.py, [adapt]
        self.console: ConsoleServer | None = None  # cloud_trainer/serve/console/, [console]
        self.metrics_endpoint: MetricsEndpoint | None = None  # metrics.py, [metrics]
        self.leader: LeaderLock | None = None  # storage/leader.py, with [database]
        self.scheduler: JobScheduler | None = None  # in the leader only, with [database]
        self.connected = threading.Event()
        self.stats: dict[str, int] = {"reports": 0, "bad_reports": 0, "fleet_bad": 0}
        # Refused state/birth by "<kind>/<reason>" (agent.wire.control.REJECT_REASONS).
        self.control_rejects: Counter[str] = Counter()
        # Messages a callback failed on (dropped), per callback; see cloud_trainer/guard.py.
        self.callback_errors: Counter[str] = Counter()
        self._bad_log = RateLimitedLog(log, 10.0)
        # Set when a thread died of an uncaught exception: the daemon then exits non-zero.
        self.fatal: str | None = None
        self._death_watch = ThreadDeathWatch(self._on_thread_death)

    # --- lifecycle
    def start(self) -> TrainerService:
        cfg = self.config
        self.lock.acquire("run-now" if self.oneshot else "daemon")
        if not self.oneshot:
            self._death_watch.install()
        try:
            cfg.trainer.state_dir.mkdir(parents=True, exist_ok=True)
            self.key = load_private_key(cfg.trainer.signing_key_file)
            cfg.mqtt.resolve_password()  # a missing secret is a ConfigError now, not later
            self._open_storage()
            self.models = {mid: ModelRuntime.load(mid, sec) for mid, sec in cfg.models.items()}
            with self._registry_startup_lock():
                for rt in self.models.values():
                    ensure_initial_version(self.registry, rt)
            self._connect()
            self.retrainer = Retrainer(cfg, self.registry, self.store, self.runs, self.fleet,
                                       _Channel(self.client, self.publisher,
                                                self.topics.manifest, self._check_fence),
                                       self.key, self.models, self.progress,
                                       stop=self.stopping.is_set, on_change=self.publish_state)
            self._serve_current()
            if not self.oneshot:
                self._start_parts()
        except BaseException:  # a half-started service releases what it took; re-raised
            self.stop()
            raise
        log.info("trainer %s started for fleet %s (%s)", cfg.trainer.id, cfg.trainer.fleet,
                 "run-now" if self.oneshot else f"jobs: {', '.join(cfg.job_ids) or 'none'}")
        return self

    def _start_parts(self) -> None:
        """The daemon's subsystems, each per its section; the scheduler last (directly,
        or through the leader lock when elected)."""
        cfg = self.config
        if cfg.ingest.enabled:
            self._start_ingest()
        if cfg.split.enabled:
            self._start_split()
        if cfg.adapt.enabled:
            self._start_adapt()
        if cfg.console.enabled:
            self._start_console()
        if cfg.metrics.prometheus_port is not None:
            from cloud_trainer.metrics import MetricsEndpoint

            self.metrics_endpoint = MetricsEndpoint(self, cfg.metrics.prometheus_port,
                                                    cfg.metrics.prometheus_bind)
            self.parts.start("metrics", self.metrics_endpoint)
        if cfg.database.enabled:
            self._stand_for_leader()
        else:
            self._start_scheduler()

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint bound (``prometheus_port = 0``: any free one)."""
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the subsystems (the scheduler first), let a running job finish (bounded),
        say offline, disconnect."""
        self.stopping.set()
        self.parts.stop_all()  # the last started first: scheduler, leader ... ingest
        if self._run_lock.acquire(timeout=timeout):
            self._run_lock.release()
        else:
            log.warning("a run is still going after %.0f s; it will be resumed", timeout)
        # Shutting down, each suppress(Exception) below lets the next step run whatever this
        # one raised: the lock must be released and the process must end either way.
        if self.client is not None:
            if not self.oneshot and self.connected.is_set():
                with contextlib.suppress(Exception):
                    self.client.publish(self.topics.trainer_state(self.config.trainer.id),
                                        self._state_payload("offline"), qos=1,
                                        retain=True).wait_for_publish(5)
            if self.publisher is not None:
                with contextlib.suppress(Exception):
                    self.publisher.close()
            self.client.stop()
            self.client = None
        if self.store is not None:
            self.store.close()
        if self.engine is not None:
            self.engine.dispose()
        self._death_watch.uninstall()
        self.lock.release()

    def __enter__(self) -> TrainerService:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _main_endpoint(self) -> MqttEndpoint:
        """``[mqtt]`` for the main connection; a run-now beside the daemon gets its own
        client id and a clean session, so it never takes over the daemon's."""
        mqtt_cfg = self.config.mqtt
        if not self.oneshot:
            return mqtt_cfg
        main = mqtt_cfg.client_id or f"knet-trainer-{self.config.trainer.id}"
        return mqtt_cfg.model_copy(update={"client_id": f"{main}-run-now-{os.getpid()}",
                                           "clean_start": True, "session_expiry": 0})

    def _open_storage(self) -> None:
        """SQLite files in the state directory, or the shared PostgreSQL (schema checked)."""
        cfg, s = self.config, self.config.store
        limits = StoreLimits(max_age_s=s.max_age_s, max_bytes=s.max_bytes,
                             device_max_bytes=s.device_max_bytes,
                             device_max_count=s.device_max_count)
        if not cfg.database.enabled:
            self.registry = Registry(cfg.registry_dir)
            self.runs = RunLog(cfg.registry_dir)
            self.store = SQLiteSampleStore(cfg.store_dir, limits)
            return
        from cloud_trainer.ingest.postgres import PostgresSampleStore
        from cloud_trainer.storage import fence, migrate
        from cloud_trainer.storage.engine import make_engine

        db = cfg.database
        self.engine = make_engine(db)
        migrate.check(self.engine, db.display())  # SchemaError names the upgrade command
        fence.install(self.engine, cfg.trainer.fleet, self._epoch)
        self.registry = Registry(cfg.registry_dir, engine=self.engine)
        self.runs = RunLog(cfg.registry_dir, engine=self.engine, owner=cfg.trainer.id)
        self.store = PostgresSampleStore(db.conninfo(), limits, where=db.display())
        log.info("trainer state in %s", db.display())

    @contextlib.contextmanager
    def _registry_startup_lock(self) -> Iterator[None]:
        """Replicas starting at once on an empty registry: one registers v1, the others
        wait and then find it (without it two registered v1/v2, or one saw a version not
        yet pushed and refused to start)."""
        if self.engine is None:
            yield
            return
        with self.engine.begin() as conn:
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7259002)")  # released at end
            yield

    def _stand_for_leader(self) -> None:
        from cloud_trainer.storage.leader import LeaderLock

        db = self.config.database
        # a standby stops trying; a leader's lock goes with its session
        self.leader = LeaderLock(db.conninfo(), self.config.trainer.fleet,
                                 on_elected=self._start_scheduler,
                                 on_lost=self._on_leadership_lost,
                                 poll_s=db.leader_poll_s, holder=self.config.trainer.id)
        self.parts.start("leader", self.leader)

    def _epoch(self) -> int | None:
        """The fencing epoch this replica claimed when elected (None: never led)."""
        return None if self.leader is None else self.leader.epoch

    def _check_fence(self) -> None:
        if self.engine is not None:
            from cloud_trainer.storage import fence

            fence.check(self.engine, self.config.trainer.fleet, self._epoch())

    def _on_leadership_lost(self, why: str) -> None:
        """Stop scheduling at once and exit non-zero: restarted, this replica stands again."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self._on_thread_death(f"leader-lock ({why})", None)

    @property
    def is_leader(self) -> bool:
        """Whether this process runs the scheduler (always, without [database])."""
        return self.leader is None or bool(self.leader.is_leader)

    def _connect(self) -> None:
        cfg = self.config
        will = None if self.oneshot else Will(self.topics.trainer_state(cfg.trainer.id),
                                              self._state_payload("offline"))
        client = make_client(self._main_endpoint(), will=will,
                             default_client_id=f"knet-trainer-{cfg.trainer.id}")
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        for kind in DEVICE_KINDS:
            client.message_callback_add(self.topics.all_devices(kind.value), guard_callback(
                kind.value, self._on_device_message, self.callback_errors, self._bad_log))
        self.client = client
        shared = None
        if self.engine is not None:  # replicas: blocks in PostgreSQL, the leader answers
            from cloud_trainer.storage.blobs import SharedBlobs

            shared = SharedBlobs(self.engine)
        self.publisher = BlobPublisher(
            client, self.topics, cfg.trainer.state_dir / "blobs", shared=shared,
            answers=None if shared is None else lambda: bool(self.leader and
                                                             self.leader.is_leader))
        self.publisher.start()
        client.start()
        timeout = cfg.mqtt.connect_timeout_s
        if not self.connected.wait(timeout):
            log.warning("trainer: no connection to %s within %.0f s; still trying",
                        cfg.mqtt.describe(), timeout)

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any,
                    _p: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("trainer connection refused: %s", reason)
            return
        client.subscribe([(self.topics.all_devices(kind.value), 1) for kind in DEVICE_KINDS])
        if self.adapter is not None:
            self.adapter.attach(client, self.topics)
        if self.console is not None:
            self.console.attach(client, self.topics)
        self.connected.set()
        if not self.oneshot:
            self.publish_state()

    def _on_thread_death(self, thread: str, _exc: BaseException | None) -> None:
        """A network or worker thread died: stop, so the process exits and is restarted."""
        if self.fatal is None:
            self.fatal = thread
        self.stopping.set()
        self._requests_event.set()

    def _on_disconnect(self, *_: Any) -> None:
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("trainer disconnected from the broker; reconnecting")

    def _on_device_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """Route a device message by its topic's kind (paho's thread; guarded)."""
        try:
            topic = self.topics.parse(msg.topic)
        except TopicError as exc:
            self.stats["fleet_bad"] += 1
            self._bad_log.log(logging.WARNING, ("topic", ""), "message on %r dropped: %s",
                              msg.topic, exc)
            return
        if topic.device is None:
            return
        if topic.kind is TopicKind.UPDATE:
            self._on_report(topic.device, bytes(msg.payload))
        elif topic.kind in (TopicKind.STATE, TopicKind.BIRTH):
            self._on_fleet_message(topic.kind, topic.device, bytes(msg.payload))

    def _on_fleet_message(self, kind: TopicKind, device: str, payload: bytes) -> None:
        try:
            if kind is TopicKind.STATE:
                self.fleet.update_state(device, payload)
            else:
                self.fleet.update_birth(device, payload)
        except ControlMessageError as exc:
            self.stats["fleet_bad"] += 1
            self.control_rejects[f"{kind.value}/{exc.reason}"] += 1
            self._bad_log.log(logging.WARNING, (kind.value, device), "bad %s from %s: %s",
                              kind.value, device, exc)

    def _on_report(self, device: str, payload: bytes) -> None:
        if not self.is_leader:
            return  # every replica hears it; the leader (whose rollout waits on it) stores it
        try:
            report = UpdateReport.parse(payload)
            if report.device != device:
                raise UpdateReportError(f"report names {report.device!r} on {device}'s topic")
            self.runs.add_report(report)
            self.stats["reports"] += 1
            log.info("update report from %s: %s v%d %s %s", device, report.model_id,
                     report.version, report.status, report.reason or "")
        except UpdateReportError as exc:
            self.stats["bad_reports"] += 1
            self._bad_log.log(logging.WARNING, ("update", device),
                              "bad update report from %s: %s", device, exc)
        except Exception:  # never kill paho's thread (e.g. a locked database)
            self.stats["bad_reports"] += 1
            log.exception("storing the update report from %s failed", device)

    def _serve_current(self) -> None:
        """After a restart, answer re-requests for what the retained manifests name."""
        for model_id in self.models:
            path = self.retrainer.current_manifest_path(model_id)
            if not path.is_file():
                continue
            try:
                self.publisher.serve(SignedManifest.model_validate_json(path.read_bytes()))
            except (OSError, ValueError) as exc:
                log.warning("cannot serve %s's current manifest %s: %s", model_id, path, exc)

    def _start_ingest(self) -> None:
        from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings

        cfg, ing = self.config, self.config.ingest
        settings = cfg.mqtt.connection("ingest").derive(
            IngestSettings, client_id=f"knet-ingest-{cfg.trainer.id}",
            # A name only key holders can derive: a device cannot join the group and take
            # activations from it (cloud_trainer/release/keys.py, docs/broker.md).
            share_group=secret_share_group(ing.share_group, self.key), shared=ing.shared,
            partitions=ing.replicas, partition=ing.replica,
            receive_maximum=ing.receive_maximum, max_payload=ing.max_payload,
            validation=ing.validation,
            # The boundaries the deployed models have (0 = input .. N = logits), each with
            # its shape; every version of a model shares them (the registry loads each
            # version's weights into the same skeleton).
            model_boundaries={mid: dict(enumerate(tuple(s) for s in
                                                  rt.initial_student.boundary_shapes))
                              for mid, rt in self.models.items()})
        ingestor = self.ingestor = Ingestor(settings, self.topics, self.store, self.fleet)
        # no wait for the SUBACK: the daemon goes on starting; the broker keeps the session
        self.parts.start("ingest", Managed(lambda: ingestor.start(wait=False), ingestor.stop))

    def _start_split(self) -> None:
        from cloud_trainer.serve.split import SplitServer

        cfg = self.config
        model_id = cfg.split.model or next(iter(cfg.models))
        endpoint = cfg.mqtt.connection("split").derive(
            MqttEndpoint, client_id=f"knet-split-{cfg.trainer.id}")
        self.split = SplitServer(self.models[model_id].teacher, model_id, self.topics, endpoint,
                          workers=cfg.split.workers,
                          # replicas answer each request once (a lost request times out
                          # on the device, which falls back; nothing to keep durable)
                          share_group=secret_share_group(f"{cfg.ingest.share_group}-split",
                                                         self.key)
                          if cfg.ingest.replicas > 1 or cfg.database.enabled else None)
        self.parts.start("split", self.split)

    def _start_adapt(self) -> None:
        from cloud_trainer.plan.adaptive import for_service

        self.adapter = for_service(self)
        self.parts.start("adapt", self.adapter)
        if self.client is not None and self.client.is_connected():
            self.adapter.attach(self.client, self.topics)

    def _start_console(self) -> None:
        from cloud_trainer.serve.console.server import ConsoleServer

        self.console = ConsoleServer(self, self.config.console)
        self.parts.start("console", self.console)
        if self.client is not None and self.client.is_connected():
            self.console.attach(self.client, self.topics)

    # --- scheduler
    def _start_scheduler(self) -> None:
        """Without [database] at start; with it, on the leader lock's thread when elected."""
        assert self.runs is not None  # opened by start() before any subsystem
        self.scheduler = JobScheduler(self.config, self.runs, self, engine=self.engine)
        self.parts.start("scheduler", self.scheduler)

    # --- runs
    def run_job(self, job_id: str, trigger: str = "manual") -> Run:
        """One run of ``job_id`` (serialised: never two runs at once in this process)."""
        with self._run_lock:
            if self.stopping.is_set() and trigger == "schedule":
                raise RuntimeError("the trainer is stopping")
            if trigger == "schedule" and not self.is_leader:  # lost the lock meanwhile
                raise RuntimeError("this replica no longer leads the scheduler")
            return self.retrainer.run(job_id, trigger)

    def run_now_requests(self) -> None:
        """Apply ``jobs run-now`` request files: move each job's next run to now."""
        folder = requests_dir(self.config)
        if self.scheduler is None:
            if folder.is_dir() and any(folder.glob("*.json")):
                log.warning("run-now requests wait: this replica does not lead the scheduler")
            return
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                job_id = json.loads(path.read_text())["job"]
                self.config.job(job_id)
                self.scheduler.run_now(job_id)
                log.info("job %s: run-now requested", job_id)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # unreadable or not {"job": <configured id>} (ConfigError is a ValueError,
                # apscheduler's JobLookupError a KeyError)
                log.warning("run-now request %s ignored: %s", path.name, exc)
            with contextlib.suppress(OSError):
                path.unlink()

    def wait(self) -> None:
        """Until ``stopping``; SIGUSR1 (run-now) wakes it to read the request files."""
        signal.signal(signal.SIGUSR1, lambda *_: self._requests_event.set())
        self.run_now_requests()
        last_state = time.monotonic()
        while not self.stopping.is_set():
            if self._requests_event.wait(1.0):
                self._requests_event.clear()
                if self.stopping.is_set():
                    break
                self.run_now_requests()
            if time.monotonic() - last_state >= STATE_INTERVAL_S:
                last_state = time.monotonic()
                self.publish_state()  # fresh ingest and fleet counters for dashboards

    # --- trainer state
    def _state_payload(self, state: str) -> bytes:
        fields: dict[str, Any] = {"state": state, "trainer": self.config.trainer.id,
                                  "fleet": self.config.trainer.fleet, "pid": os.getpid(),
                                  "started_at": self.started_at, "time": time.time(),
                                  "leader": self.is_leader}
        if state == "online" and self.runs is not None:
            fields.update(self._state_summary())
        return TrainerState.model_validate(fields).payload()

    def _state_summary(self) -> dict[str, Any]:
        """What ``online`` tells dashboards: runs per job, devices, dropped, ingest, models."""
        runs = self.runs.runs(kind="run", limit=200)
        latest: dict[str, RunSummary] = {}
        for r in runs:
            if r.job_id not in latest:
                latest[r.job_id] = RunSummary(
                    run_id=r.run_id, status=r.status, version=r.version, reason=r.reason[:200],
                    started_at=r.started_at.isoformat(),
                    finished_at=r.finished_at.isoformat() if r.finished_at else None)
        body: dict[str, Any] = {
            "rounds": sum(r.status == "pushed" for r in runs), "runs": latest,
            "devices_online": len(self.fleet.online()),
            # Device messages the trainer's own connection refused or failed on (dropped).
            "dropped": {"fleet_bad": self.stats["fleet_bad"],
                        "bad_reports": self.stats["bad_reports"],
                        "callback_errors": dict(self.callback_errors),
                        "control_rejects": dict(self.control_rejects)},
        }
        if self.ingestor is not None:
            m = self.ingestor.metrics()
            # received == stored + duplicates + rejected + queue_depth (activations);
            # bad_total adds the refused state/birth messages and bad topics.
            body["ingest"] = {k: m[k] for k in ("received", "stored", "duplicates",
                                                "rejected", "rejects", "bad_total",
                                                "queue_depth", "control_rejects")}
        body["models"] = {}
        for mid in self.models:
            v = self.registry.deployed(mid)
            body["models"][mid] = {"deployed": v.version if v else None}
        return body

    def publish_state(self) -> None:
        if self.oneshot or self.client is None:
            return
        try:
            self.client.publish(self.topics.trainer_state(self.config.trainer.id),
                                self._state_payload("online"), qos=1, retain=True)
        except Exception:  # called from runs and paho's thread: a state must never end either
            log.exception("publishing the trainer state failed")


def requests_dir(config: TrainerConfig) -> Path:
    return config.trainer.state_dir / "requests"


def request_run_now(config: TrainerConfig, job_id: str) -> tuple[int, float]:
    """Ask the daemon holding the lock to run ``job_id`` now; returns (pid, request time)."""
    info = lock_info(config.lock_file)
    if info is None or info.get("purpose") != "daemon" or not isinstance(info.get("pid"), int):
        raise SchedulerLocked(f"{config.lock_file}: no daemon to ask "
                              f"({holder(config.lock_file) or 'free'})")
    folder = requests_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    at = time.time()
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps({"job": job_id, "requested_at": at}))
    tmp.replace(folder / f"{uuid.uuid4().hex}.json")
    os.kill(int(info["pid"]), signal.SIGUSR1)
    return int(info["pid"]), at


def list_jobs(config: TrainerConfig) -> list[dict[str, Any]]:
    """Every configured job with its stored schedule and last run, without a scheduler."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    stored: dict[str, Any] = {}
    engine = None
    runs: RunLog | None = None
    if config.database.enabled:
        from cloud_trainer.storage.engine import make_engine

        engine = make_engine(config.database, pool_size=1)
        runs = RunLog(config.registry_dir, engine=engine)
    elif config.registry_dir.exists():
        runs = RunLog(config.registry_dir)
    if engine is not None or config.jobs_db.exists():
        store = (SQLAlchemyJobStore(engine=engine) if engine is not None
                 else SQLAlchemyJobStore(url=f"sqlite:///{config.jobs_db}"))
        store.start(BackgroundScheduler(timezone=UTC), "default")  # reading only, never run
        stored = {j.id: j for j in store.get_all_jobs()}
        store.shutdown()
    out = []
    for job in config.jobs:
        j = stored.get(job.id)
        history = runs.runs(job.id, limit=50) if runs else []
        last = next((r for r in history if r.kind == "run"), None)
        out.append({
            "id": job.id, "model": job.model,
            "trigger": str(j.trigger) if j else str(make_trigger(job)),
            "stored": j is not None,
            "next_run": j.next_run_time.isoformat() if j and j.next_run_time else None,
            "last_status": last.status if last else None,
            "last_version": last.version if last else None,
            "last_reason": last.reason if last else "",
            "missed": sum(r.status == "missed" for r in history if r.kind == "event"),
            "failed": sum(r.status == "failed" for r in history),
        })
    return out


__all__ = ["SchedulerLocked", "SigningError", "TrainerService", "list_jobs",
           "request_run_now", "scheduled_run"]
