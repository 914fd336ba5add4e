"""`knet demo` as a user runs it: Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_helpers import REPO, wait_until

from knet_lab.fleet import pids_alive

pytestmark = [pytest.mark.slow]


def _pids(out: Path) -> list[dict[str, object]]:
    try:
        return list(json.loads((out / "pids.json").read_text()))
    except (OSError, ValueError):
        return []


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "knet_cli.main", "demo", "--devices",
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


def test_a_drift_that_defeats_the_teacher_is_refused_at_the_start(tmp_path: Path) -> None:
    """Sensor noise at 0.4 leaves EfficientNet-Lite0 agreeing with itself on well under
    half of the frames: label-free retraining cannot recover that, so the demo says so and
    exits non-zero before it starts a single process."""
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "knet_cli.main", "demo", "--model",
                        "effnet-lite0", "--drift", "noise", "--devices", "2", "--out",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert "too strong for the teacher itself" in text and "--teacher-floor" in text
    assert _pids(out) == []  # nothing was started
