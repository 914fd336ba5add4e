"""Build a real deployment for agent tests: exported blocks, an input file, agent.toml."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agent.wire.envelope import Envelope

REPO = Path(__file__).resolve().parent.parent
_EXPORTS: dict[str, Path] = {}


def exported_digits(root: Path) -> Path:
    """The (untrained) digits student exported once per test session; returns its dir."""
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.models.zoo import get_pair

    if "digits" not in _EXPORTS:
        out = root / "digits-student"
        export_partition(get_pair("digits").student, out, model_id="digits", model_version=1,
                         ort_version="1.16.3")
        _EXPORTS["digits"] = out
    return _EXPORTS["digits"]


def write_inputs(path: Path, n: int, *, bad_rows: tuple[int, ...] = ()) -> Path:
    from cloud_trainer.models.data import digits_splits

    s = digits_splits()
    x = np.resize(s.x_test, (n, 1, 8, 8)).astype(np.float32)
    y = np.resize(s.y_test, n)
    for r in bad_rows:
        x[r] = np.nan  # a sensor glitch: not a usable input
    np.savez(path, x=x, y=y)
    return path


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(i) for i in v) + "]"
    return str(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def agent_config(tmp: Path, broker_port: int, manifest: Path, *, device: str = "dev-1",
                 source: dict[str, Any] | None = None, **overrides: dict[str, Any]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "device": {"id": device, "fleet": "lab", "state_dir": tmp / f"state-{device}",
                   "cache_dir": tmp / f"cache-{device}"},
        "model": {"manifest": manifest, "profile": "x86-dev"},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "reconnect_min_delay": 0.1,
                 "reconnect_max_delay": 0.5, "keepalive": 10},
        "source": source or {"kind": "npz", "path": tmp / "inputs.npz"},
        "uplink": {"boundaries": [1, 2], "codec": "uint8+lz4"},
        "metrics": {"stats_interval_s": 0.5},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return write_config(tmp / f"{device}.toml", sections)


def start_agent(config: Path, *extra: str, env: dict[str, str] | None = None
                ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "--log-level", "INFO",
         *extra],
        cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def envelopes(payloads: list[bytes]) -> list[Envelope]:
    return [Envelope.unpack(p) for p in payloads]


def spooled(state_dir: Path) -> int:
    """How many records the agent with ``state_dir`` holds in its spool now (read-only,
    while it runs: SQLite's WAL lets a reader in beside the writer); 0 before it exists."""
    path = Path(state_dir) / "spool" / "spool.sqlite3"
    if not path.exists():
        return 0
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT count(*) FROM records").fetchone()[0])
    except sqlite3.OperationalError:  # created, its table not yet
        return 0
    finally:
        con.close()
