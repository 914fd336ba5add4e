"""What every benchmark emits: a rich table on the terminal and a JSON record with the machine."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough that a table piped to a file is not cut into ellipses.
console = Console(width=None if sys.stdout.isatty() else 160)

_PACKAGES = ("numpy", "onnxruntime", "torch", "zfpy", "lz4", "paho-mqtt")


def machine_info() -> dict[str, Any]:
    """Enough about the machine to compare a figure with one taken elsewhere."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "packages": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title, header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def write_json(path: Path | str | None, name: str, command: str, results: Any) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "command": command, "machine": machine_info(), "results": results}
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    console.print(f"[dim]wrote {path}[/dim]")
    return path


def command_line() -> str:
    return "knet " + " ".join(sys.argv[1:]) if sys.argv else "knet"
