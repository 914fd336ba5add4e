"""Shared fixtures. MQTT tests start their own Mosquitto on a free loopback port."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.launcher import Mosquitto

# PostgreSQL fixtures (`postgres`, `pg_database`): tests/pg_helpers.py.
pytest_plugins = ["pg_helpers"]

REPO = Path(__file__).resolve().parent.parent


def tool(name: str) -> str:
    """The path of a command-line tool of the dev extra (next to this Python if not on PATH)."""
    path = shutil.which(name) or (Path(sys.executable).parent / name)
    if not Path(path).is_file():
        pytest.fail(f"{name} is not installed: scripts/bootstrap.sh installs it (knet[dev])")
    return str(path)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private, anonymous Mosquitto with persistence, stopped by its PID afterwards."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test (imported here: conftest must not need torch)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
