"""``knet fleet list|show DEVICE|watch``: the Fleet and Device pages on the command line.

Reads the console's JSON API (``/api/fleet``, ``/api/devices/<id>``) with a bearer token, so
the operator needs no broker account and sees exactly what the browser sees. The token
comes from ``--token-file`` or ``$KNET_CONSOLE_TOKEN`` (never a command-line argument: it
would sit in the process list and the shell history).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cloud_trainer.errors import KnetTrainerError

DEFAULT_URL = "http://127.0.0.1:8650"
out = Console()


class ConsoleApiError(KnetTrainerError, RuntimeError):
    """The console could not be reached or refused the request (the reason is its own)."""


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        return Path(args.token_file).read_text().strip()
    return os.environ.get("KNET_CONSOLE_TOKEN") or None


def fetch(args: argparse.Namespace, path: str) -> Any:
    """GET ``path`` of the console API as JSON; ConsoleApiError with the console's reason."""
    req = urllib.request.Request(args.url.rstrip("/") + path,
                                 headers={"Accept": "application/json"})
    token = _token(args)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    try:
        with urllib.request.urlopen(req, timeout=args.timeout, context=ctx) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", "")
        except ValueError:
            reason = ""
        raise ConsoleApiError(f"{args.url}{path}: {exc.code} {reason or exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConsoleApiError(f"{args.url}{path}: {exc}") from None


def _n(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def fleet_table(body: dict[str, Any]) -> Table:
    t = Table(title=f"fleet {body.get('fleet', '?')}")
    for col in ("device", "state", "since", "profile", "model", "partition", "frames/s",
                "uplink B/s", "spool", "last update"):
        t.add_column(col, justify="right" if col in ("frames/s", "uplink B/s", "spool")
                     else "left")
    colour = {"online": "green", "stopped": "yellow", "offline": "red"}
    for d in body.get("devices", []):
        upd = d.get("last_update") or {}
        t.add_row(d["device"], f"[{colour.get(d['state'], 'white')}]{d['state']}[/]",
                  d.get("since") or "–", d.get("profile") or "–",
                  f"{d.get('model_id') or '–'} v{d.get('model_version') or '?'}",
                  d.get("partition") or "–", _n(d.get("fps")), _n(d.get("bytes_out_per_s"), 0),
                  str(d["spool_records"]) if d.get("spool_records") is not None else "–",
                  f"{upd['status']} v{upd['version']} {upd.get('reason') or ''}".strip()
                  if upd else "–")
    return t


def device_table(d: dict[str, Any]) -> Table:
    t = Table(title=f"device {d['device']}", show_header=False)
    t.add_column("field")
    t.add_column("value")
    for k in ("state", "since", "profile", "agent_version", "model_id", "model_version",
              "partition", "fps", "bytes_out_per_s", "spool_records"):
        t.add_row(k, str(d.get(k) if d.get(k) is not None else "–"))
    t.add_row("blocks", " ".join(f"{b}:{s}" for b, s in d.get("blocks", {}).items()))
    for u in d.get("updates", [])[:10]:
        t.add_row("update", f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(u['time']))} "
                            f"{u['model_id']} v{u['version']} {u['status']} {u['reason'] or ''}")
    return t


def _list(args: argparse.Namespace) -> int:
    body = fetch(args, "/api/fleet")
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        out.print(fleet_table(body))
    return 0


def _show(args: argparse.Namespace) -> int:
    body = fetch(args, "/api/devices/" + urllib.parse.quote(args.device, safe=""))
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        out.print(device_table(body))
    return 0


def _watch(args: argparse.Namespace) -> int:
    """Refresh until Ctrl-C (or ``--count`` refreshes); ``--json`` prints one line each."""
    n = 0
    if args.json:
        while args.count is None or n < args.count:
            print(json.dumps(fetch(args, "/api/fleet")), flush=True)
            n += 1
            if args.count is None or n < args.count:
                time.sleep(args.interval)
        return 0
    with Live(fleet_table(fetch(args, "/api/fleet")), console=out, auto_refresh=False) as live:
        while args.count is None or n < args.count:
            time.sleep(args.interval)
            live.update(fleet_table(fetch(args, "/api/fleet")), refresh=True)
            n += 1
    return 0


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ConsoleApiError as exc:
            out.print(f"[red]knet fleet:[/] {exc}")
            return 1
    return wrapped


def _new_token(args: argparse.Namespace) -> int:
    """Append a new token's hashed line to the tokens file; print the token once."""
    import secrets

    from cloud_trainer.serve.console.auth import TokenFileError, token_line

    token = secrets.token_urlsafe(24)
    try:
        line = token_line(args.role, args.name, token)
    except TokenFileError as exc:
        out.print(f"[red]knet console token:[/] {exc}")
        return 2
    path: Path = args.tokens_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")
    out.print(f"{args.role} token for {args.name} added to {path} (stored hashed); it is "
              "shown only now:", highlight=False)
    print(token)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fleet", help="the fleet as the trainer's console sees it")
    fsub = p.add_subparsers(dest="fleet_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("KNET_CONSOLE_URL", DEFAULT_URL),
                        help="the console's address ($KNET_CONSOLE_URL)")
    common.add_argument("--token-file", type=Path, default=None,
                        help="a file holding a console token (else $KNET_CONSOLE_TOKEN)")
    common.add_argument("--ca-file", default=None, help="CA bundle for an https console")
    common.add_argument("--timeout", type=float, default=10.0)
    common.add_argument("--json", action="store_true", help="JSON instead of a table")
    fsub.add_parser("list", parents=[common], help="every device").set_defaults(
        func=_run(_list))
    s = fsub.add_parser("show", parents=[common], help="one device, with its update history")
    s.add_argument("device")
    s.set_defaults(func=_run(_show))
    w = fsub.add_parser("watch", parents=[common], help="the fleet table, refreshed")
    w.add_argument("--interval", type=float, default=2.0)
    w.add_argument("--count", type=int, default=None, help="stop after N refreshes")
    w.set_defaults(func=_run(_watch))

    c = sub.add_parser("console", help="the trainer's web console")
    csub = c.add_subparsers(dest="console_command", required=True)
    t = csub.add_parser("token", help="make a login token; its hash goes to the tokens file")
    t.add_argument("--tokens-file", type=Path, required=True,
                   help="[console] tokens_file of trainer.toml")
    t.add_argument("--role", choices=["read", "operator"], default="read")
    t.add_argument("--name", required=True, help="who holds it (shown in the console, logs)")
    t.set_defaults(func=_new_token)
