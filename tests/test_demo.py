"""`knet demo` as a user runs it: Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_helpers import REPO, wait_until

from cloud_trainer.fleet_lab import pids_alive

pytestmark = [pytest.mark.slow]


def _pids(out: Path) -> list[dict[str, object]]:
    try:
        return list(json.loads((out / "pids.json").read_text()))
    except (OSError, ValueError):
        return []


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "cloud_trainer.cli", "demo", "--devices",
                             "1", "--duration", "120", "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        # broker wrapper, mosquitto, trainer, agent: all up, and the agent streaming
        assert wait_until(lambda: len(_pids(out)) >= 4 and
                          (out / "logs" / "pi4-kitchen.log").exists() and
                          "connected" in (out / "logs" / "pi4-kitchen.log").read_text(), 240,
                          interval=0.5)
        pids = [int(str(p["pid"])) for p in _pids(out)]
        assert len(pids_alive(pids)) == len(pids)
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert demo.wait(60) == 130
        assert pids_alive(pids) == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
