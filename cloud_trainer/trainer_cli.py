"""`knet-trainer`: the cloud side's operator commands.

Today: inspect and roll back the model registry, and serve split inference (teacher blocks
k+1..N) for a fleet. The scheduled retraining service (`knet-trainer --config trainer.toml`)
is the trainer issue's work and is not here yet.
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
    from cloud_trainer.registry import Registry

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
    from agent.topics import Topics
    from cloud_trainer.serve import SplitServer
    from cloud_trainer.train import trained_pair

    pair = trained_pair(args.model, seed=args.seed)
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with SplitServer(pair.teacher, args.model, Topics(args.fleet), args.host, args.port,
                     username=args.username, password=password, workers=args.workers) as srv:
        console.print(f"serving {args.model} teacher blocks for fleet {args.fleet} on "
                      f"{args.host}:{args.port} (Ctrl-C to stop)")
        stop.wait()
        console.print(f"stopped: {srv.stats}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knet-trainer", description=__doc__.splitlines()[0])
    p.add_argument("--registry", type=Path,
                   default=Path(os.environ.get("KNET_REGISTRY", "/var/lib/knet/registry")))
    sub = p.add_subparsers(dest="command", required=True)
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    from cloud_trainer.registry import RegistryError

    try:
        return int(args.func(args))
    except RegistryError as exc:
        print(f"knet-trainer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
