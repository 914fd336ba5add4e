"""The agent runs under its unit's ``SystemCallFilter=`` (agent/systemd/knet-agent.service).

No systemd runs here, so the filter is installed the way systemd installs it: the unit's
groups expanded with ``systemd-analyze syscall-filter``, native ABI only, loaded with
libseccomp before exec (tests/seccomp_exec.py). A call outside the set kills the agent
(SIGSYS) where the unit would return EPERM, so a clean run proves the exercised paths make
none: a fused onnxruntime session and its threads, MQTT over TLS with the password from a
systemd credential, the on-disk spool, sd_notify READY/WATCHDOG/RELOADING/STOPPING, the
Prometheus endpoint, SIGHUP reload and SIGTERM shutdown. Not exercised here: an
over-the-air update, and the CUDA/TensorRT providers of a Jetson.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from agent_helpers import REPO, agent_config, exported_digits, write_inputs
from mqtt_helpers import Collector

from agent.wire.topics import Topics
from broker.bulk import provision_list
from broker.devicelist import DeviceEntry
from broker.launcher import Mosquitto, free_port
from broker.provision import fleet_settings, layout, provision_trainer

UNIT = REPO / "agent" / "systemd" / "knet-agent.service"
HELPER = Path(__file__).resolve().parent / "seccomp_exec.py"
LAB = Topics("lab")


def unit_filter() -> list[str]:
    """The unit's allow-list, checked to be the form this test reproduces."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(UNIT)
    svc = unit["Service"]
    assert svc.get("SystemCallArchitectures") == "native"
    assert svc.get("SystemCallErrorNumber") == "EPERM"
    sets = svc["SystemCallFilter"].split()
    assert sets and not any(s.startswith("~") for s in sets), \
        "this test reproduces an allow-list filter; teach it deny-lists before using one"
    return sets


def filtered(command: list[str], action: str = "kill") -> list[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd "
                    "(scripts/bootstrap.sh does)")
    return [sys.executable, str(HELPER), "--action", action, "--analyze", analyze,
            *unit_filter(), "--", *command]


def test_the_filter_is_enforced_here() -> None:
    """The control: ptrace (@debug, outside @system-service) kills a filtered process, and
    returns EPERM under the unit's SystemCallErrorNumber. Without this, a passing agent
    run below could mean a filter that does nothing."""
    call = "import ctypes; print(ctypes.CDLL(None).ptrace(0, 0, 0, 0), flush=True)"
    killed = subprocess.run(filtered([sys.executable, "-c", call]), capture_output=True,
                            text=True, timeout=60)
    assert killed.returncode == -signal.SIGSYS, killed.stderr
    assert "system calls allowed (@system-service)" in killed.stderr
    refused = subprocess.run(filtered([sys.executable, "-c", call], "eperm"),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 0 and refused.stdout.strip() == "-1", refused.stderr


def _recv_until(sock: socket.socket, got: list[str], *wanted: str) -> None:
    """Read notify datagrams until every ``wanted`` line has arrived after this call."""
    start = len(got)
    while not all(w in got[start:] for w in wanted):
        got += sock.recv(4096).decode().splitlines()


@pytest.mark.mqtt
def test_the_agent_runs_under_the_units_system_call_filter(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = exported_digits(tmp_path_factory.mktemp("model"))
    write_inputs(tmp_path / "inputs.npz", 50)
    d = tmp_path / "fleet"
    tls_port, port, prom = free_port(), free_port(), free_port()
    provision_list(d, [DeviceEntry(id="cam-01", fleet="lab", profile="x86-dev")], tls=True,
                   port=tls_port, reload=False)
    trainer = provision_trainer(d, "trainer-1", ["lab"], reload=False)
    bundle = layout(d).bundle("cam-01")
    cfg = agent_config(
        tmp_path, tls_port, model / "manifest.json", device="cam-01",
        source={"kind": "npz", "path": tmp_path / "inputs.npz", "rate_hz": 50, "loop": True},
        model={"fuse": True},
        mqtt={"password_credential": "mqtt-password"},
        **{"mqtt.tls": {"ca_file": bundle / "ca.crt"}},
        metrics={"prometheus_port": prom})
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(tmp_path / "notify"),
           "WATCHDOG_USEC": "400000", "CREDENTIALS_DIRECTORY": str(bundle / "credentials")}
    agent = [sys.executable, "-m", "agent.cli", "--config", str(cfg), "--log-level", "INFO"]
    with Mosquitto(layout(d).broker, fleet_settings(d, port, tls_port)) as broker, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
            Collector(broker.host, port, LAB.act("cam-01"), username="trainer-1",
                      password=trainer.password) as uplink:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        proc = subprocess.Popen(filtered(agent), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        got: list[str] = []
        try:
            _recv_until(notify, got, "READY=1", "WATCHDOG=1")
            assert uplink.wait_for(lambda m: len(m) >= 20, 30)  # activations over TLS
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{prom}/metrics",
                                             timeout=10).read().decode()
            assert "knet_frames_total" in metrics
            proc.send_signal(signal.SIGHUP)
            _recv_until(notify, got, "RELOADING=1", "READY=1")
            seen = len(uplink.messages)
            assert uplink.wait_for(lambda m: len(m) >= seen + 10, 30)  # still running
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        _recv_until(notify, got, "STOPPING=1")
    assert proc.returncode == 0, out[-3000:]  # -31 (SIGSYS): a call outside the filter
    assert "system calls allowed (@system-service), others: kill" in out
    assert "block by block" not in out, out[-3000:]  # the fused session ran
