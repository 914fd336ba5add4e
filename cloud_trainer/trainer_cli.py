"""`knet-trainer`: the cloud side's daemon and operator commands.

``knet-trainer --config trainer.toml`` runs the trainer daemon (``cloud_trainer/service.py``):
ingest, fleet table, scheduled retraining, signed pushes, staged rollout, split serving.
``jobs list`` / ``jobs run-now JOB`` operate its scheduled jobs; ``models list/show/rollback``
inspect the registry; ``serve-split`` answers split-inference requests on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def _registry(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from cloud_trainer.release.registry import Registry

    return Registry(args.registry)


def _models_list(args: argparse.Namespace) -> int:
    versions = _registry(args).versions(args.model)
    t = Table(title=f"registry {args.registry}", header_style="bold")
    for col in ("model", "version", "parent", "status", "created", "changed blocks", "reason"):
        t.add_column(col)
    previous: dict[str, object] = {}
    for v in versions:
        prev = previous.get(v.model_id)
        changed = v.changed_blocks(prev)  # type: ignore[arg-type]
        t.add_row(v.model_id, str(v.version), str(v.parent or "-"), v.status,
                  v.created_at.strftime("%Y-%m-%d %H:%M"), ",".join(map(str, changed)),
                  v.reason)
        previous[v.model_id] = v
    console.print(t)
    return 0


def _models_show(args: argparse.Namespace) -> int:
    print(json.dumps(_registry(args).get(args.model, args.version).to_dict(), indent=2))
    return 0


def _models_rollback(args: argparse.Namespace) -> int:
    v = _registry(args).rollback(args.model, args.version)
    console.print(f"{args.model} v{v.version} approved with the blocks of v{args.version}; "
                  "it goes out with the next push")
    return 0


def _serve_split(args: argparse.Namespace) -> int:
    from agent.mqtt.endpoint import MqttEndpoint
    from agent.wire.topics import Topics
    from cloud_trainer.serve.split import SplitServer
    from cloud_trainer.training.train import trained_pair

    pair = trained_pair(args.model, seed=args.seed)
    endpoint = MqttEndpoint(host=args.host, port=args.port, username=args.username,
                            password_file=Path(args.password_file) if args.password_file
                            else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with SplitServer(pair.teacher, args.model, Topics(args.fleet), endpoint,
                     workers=args.workers) as srv:
        console.print(f"serving {args.model} teacher blocks for fleet {args.fleet} on "
                      f"{args.host}:{args.port} (Ctrl-C to stop)")
        stop.wait()
        console.print(f"stopped: {srv.stats}")
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers parse without a regex."""

    def format(self, record: logging.LogRecord) -> str:
        body = {"time": round(record.created, 3), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def _setup_logging(fmt: str, verbose: int = 0) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    if fmt == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "apscheduler.executors"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from cloud_trainer.trainer_config import load_trainer_config

    if args.config is None:
        raise SystemExit("knet-trainer: this command needs --config trainer.toml")
    return load_trainer_config(args.config)


def _daemon(args: argparse.Namespace) -> int:
    from cloud_trainer.service import TrainerService

    config = _load_config(args)
    _setup_logging(args.log_format or config.trainer.log_format, args.verbose)
    service = TrainerService(config)
    signal.signal(signal.SIGTERM, lambda *_: service.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: service.stopping.set())
    service.start()
    try:
        service.wait()
    finally:
        logging.getLogger(__name__).info("stopping")
        service.stop()
    if service.fatal is not None:
        logging.getLogger(__name__).critical("exiting with status 1: thread %s died",
                                             service.fatal)
        return 1
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    from cloud_trainer.service import holder, list_jobs

    config = _load_config(args)
    rows = list_jobs(config)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    owner = holder(config.lock_file)
    t = Table(title=f"jobs of trainer {config.trainer.id} "
                    f"({'scheduler: ' + owner if owner else 'no scheduler running'})",
              header_style="bold")
    for col in ("job", "model", "trigger", "next run", "last run", "version", "missed",
                "failed", "reason"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], r["model"], r["trigger"], r["next_run"] or "-",
                  r["last_status"] or "-", str(r["last_version"] or "-"), str(r["missed"]),
                  str(r["failed"]), (r["last_reason"] or "")[:60])
    console.print(t)
    return 0


def _jobs_run_now(args: argparse.Namespace) -> int:
    import time

    from cloud_trainer.release.runs import RunLog
    from cloud_trainer.service import SchedulerLocked, TrainerService, lock_info, request_run_now

    config = _load_config(args)
    config.job(args.job)  # ConfigError names the configured jobs
    _setup_logging(args.log_format or config.trainer.log_format, args.verbose)
    info = lock_info(config.lock_file)
    if info is not None and info.get("purpose") == "daemon":
        pid, at = request_run_now(config, args.job)
        console.print(f"asked the trainer daemon (pid {pid}) to run {args.job} now")
        if args.no_wait:
            return 0
        runs = RunLog(config.registry_dir)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            done = [r for r in runs.runs(args.job, kind="run", limit=5)
                    if r.started_at.timestamp() >= at - 1 and r.finished]
            if done:
                return _print_run(done[0])
            time.sleep(0.5)
        print(f"knet-trainer: no finished run of {args.job} within {args.timeout:.0f} s",
              file=sys.stderr)
        return 1
    try:
        with TrainerService(config, oneshot=True) as service:
            return _print_run(service.run_job(args.job, trigger="run-now"))
    except SchedulerLocked as exc:
        print(f"knet-trainer: {exc}", file=sys.stderr)
        return 3


def _db(args: argparse.Namespace) -> int:
    """``db upgrade|check``: the PostgreSQL schema of ``[database]`` (Alembic)."""
    from cloud_trainer.storage import migrate
    from cloud_trainer.storage.engine import make_engine

    config = _load_config(args)
    db = config.database
    if not db.enabled:
        print("knet-trainer: trainer.toml has no [database] url: the state is SQLite in "
              f"{config.trainer.state_dir}, which needs no migration", file=sys.stderr)
        return 2
    engine = make_engine(db, pool_size=1)
    try:
        if args.action == "upgrade":
            before, after = migrate.upgrade(engine)
            console.print(f"{db.display()}: schema {before or 'none'} -> {after}")
        else:
            console.print(f"{db.display()}: schema {migrate.check(engine, db.display())} "
                          "(current)")
    finally:
        engine.dispose()
    return 0


def _print_run(run) -> int:  # type: ignore[no-untyped-def]
    console.print(f"run {run.run_id} of {run.job_id}: {run.status}"
                  + (f" (v{run.version})" if run.version else "")
                  + (f" — {run.reason}" if run.reason else ""))
    return 0 if run.status in ("pushed", "skipped", "rejected") else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knet-trainer", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None,
                   help="trainer.toml; without a command: run the trainer daemon")
    p.add_argument("--log-format", choices=["auto", "text", "json"], default=None)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--registry", type=Path,
                   default=Path(os.environ.get("KNET_REGISTRY", "/var/lib/knet/registry")))
    sub = p.add_subparsers(dest="command")
    # --config is also accepted after the command (SUPPRESS: it never resets an earlier one)
    cfg = argparse.ArgumentParser(add_help=False)
    cfg.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    jobs = sub.add_parser("jobs", help="the daemon's scheduled retraining jobs")
    jsub = jobs.add_subparsers(dest="action", required=True)
    j = jsub.add_parser("list", parents=[cfg], help="configured jobs, schedule, last run")
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=_jobs_list)
    j = jsub.add_parser("run-now", parents=[cfg],
                        help="run a job now (through the daemon if one runs)")
    j.add_argument("job")
    j.add_argument("--timeout", type=float, default=1800.0)
    j.add_argument("--no-wait", action="store_true")
    j.set_defaults(func=_jobs_run_now)
    d = sub.add_parser("db", help="the PostgreSQL schema of [database] (Alembic)")
    dsub = d.add_subparsers(dest="action", required=True)
    for name, text in (("upgrade", "migrate the schema to this build's revision"),
                       ("check", "exit 2 unless the schema is this build's revision")):
        dsub.add_parser(name, parents=[cfg], help=text).set_defaults(func=_db)
    models = sub.add_parser("models", help="inspect and roll back trained versions")
    msub = models.add_subparsers(dest="action", required=True)
    m = msub.add_parser("list")
    m.add_argument("--model", default=None)
    m.set_defaults(func=_models_list)
    for name, func in (("show", _models_show), ("rollback", _models_rollback)):
        m = msub.add_parser(name)
        m.add_argument("model")
        m.add_argument("version", type=int)
        m.set_defaults(func=func)
    s = sub.add_parser("serve-split", help="answer split-inference requests with the teacher")
    s.add_argument("--model", default="digits")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fleet", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=1883)
    s.add_argument("--username", default=None)
    s.add_argument("--password-file", default=None)
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(func=_serve_split)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if args.config is None:
            parser.error("give --config trainer.toml (run the daemon) or a command")
        args.func = _daemon
    elif args.command not in ("jobs",):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s "
                            "%(name)s: %(message)s")
    if args.command == "models" and args.config is not None and \
            "--registry" not in (argv if argv is not None else sys.argv):
        args.registry = _load_config(args).registry_dir
    from agent.configfile import ConfigError
    from cloud_trainer.ingest.store import StoreError
    from cloud_trainer.release.registry import RegistryError
    from cloud_trainer.service import SchedulerLocked
    from cloud_trainer.storage.migrate import SchemaError

    try:
        return int(args.func(args))
    except (RegistryError, ConfigError, SchedulerLocked, SchemaError, StoreError) as exc:
        print(f"knet-trainer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
