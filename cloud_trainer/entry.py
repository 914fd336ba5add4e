"""Console-script entry points of the ``knet`` distribution, guarded.

``pip install 'knet[agent]'`` installs the package without the trainer's dependencies, yet
pip installs every console script of a distribution: without this guard ``knet`` and
``knet-trainer`` would die with a bare ``ModuleNotFoundError``. A device should install the
``knet-agent`` distribution instead (device/pyproject.toml), which has only ``knet-agent``.
``knet`` itself starts in knet_cli/entry.py (the operator CLI's package) with this guard.
"""

from __future__ import annotations

import importlib.util
import sys

NEEDS = {"knet": ("rich",), "knet-trainer": ("rich", "torch", "apscheduler")}


def missing(prog: str) -> list[str]:
    """The modules ``prog`` needs that this environment lacks."""
    return [m for m in NEEDS[prog] if importlib.util.find_spec(m) is None]


def refuse(prog: str, absent: list[str]) -> int:
    print(f"{prog}: this environment lacks {', '.join(absent)}: the operator and trainer "
          f"commands need pip install 'knet[trainer]'. On a device use knet-agent (the "
          f"knet-agent distribution).", file=sys.stderr)
    return 2


def knet_trainer() -> int:
    absent = missing("knet-trainer")
    if absent:
        return refuse("knet-trainer", absent)
    from cloud_trainer.trainer_cli import main

    return main()
