"""sd_notify over a real AF_UNIX datagram socket, and the systemd unit that relies on it."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.notify import Notifier, watchdog_interval

UNIT = Path(__file__).resolve().parent.parent / "agent" / "systemd" / "knet-agent.service"


def _recv_all(sock: socket.socket, n: int) -> list[str]:
    sock.settimeout(2)
    return [sock.recv(4096).decode() for _ in range(n)]


def test_every_message_reaches_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        with Notifier(str(path)) as n:
            assert n.enabled
            assert n.ready("warming up") and n.watchdog() and n.status("42 fps")
            assert n.reloading() and n.ready() and n.extend_timeout(1.5)
            assert n.stopping("bye")
        msgs = _recv_all(sock, 7)
    assert msgs[:3] == ["READY=1\nSTATUS=warming up", "WATCHDOG=1", "STATUS=42 fps"]
    reload_lines = msgs[3].split("\n")
    assert reload_lines[0] == "RELOADING=1" and reload_lines[1].startswith("MONOTONIC_USEC=")
    assert int(reload_lines[1].split("=")[1]) > 0
    assert msgs[4:] == ["READY=1", "EXTEND_TIMEOUT_USEC=1500000", "STOPPING=1\nSTATUS=bye"]


def test_abstract_namespace_socket() -> None:
    name = f"knet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        n = Notifier("@" + name)
        assert n.watchdog()
        assert _recv_all(sock, 1) == ["WATCHDOG=1"]
        n.close()
        assert not n.enabled and not n.watchdog()


def test_environment_is_read_and_unset_means_no_op(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready() and not n.watchdog() and not n.stopping()
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert Notifier().ready()
        assert _recv_all(sock, 1) == ["READY=1"]


def test_a_vanished_socket_or_odd_address_is_logged_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert gone.enabled and not gone.watchdog()
    assert "sd_notify to" in caplog.text
    assert not Notifier("vsock:2:1234").enabled  # not supported here: disabled, not fatal


def test_watchdog_interval_is_half_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for junk in ("abc", "0", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", junk)
        assert watchdog_interval() is None


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(UNIT)
    return unit


def test_unit_is_a_hardened_notify_service_with_a_watchdog() -> None:
    unit = _unit()
    svc = unit["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30",
        "Restart": "on-failure", "RestartSec": "5",
        "ExecStart": "/opt/knet/.venv/bin/knet-agent --config /etc/knet/agent.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "StateDirectory": "knet", "CacheDirectory": "knet",
        "LoadCredential": "mqtt-password:/etc/knet/credentials/mqtt-password",
        "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    for key, value in expected.items():
        assert svc.get(key) == value, key
    assert svc["MemoryMax"].endswith(("M", "G"))
    assert "StartLimitIntervalSec" in unit["Unit"]  # a [Unit] key: ignored under [Service]
    assert "network-online.target" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify_finds_nothing_but_the_missing_binary(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd "
                    "(scripts/bootstrap.sh does)")
    copy = tmp_path / "knet-agent.service"
    copy.write_text(UNIT.read_text())
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=30, check=False)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip() and "/opt/knet/.venv/bin/knet-agent" not in line]
    assert problems == []
