"""``knet fleet list|show|watch`` and ``knet console token`` against a running console."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_helpers import READER_TOKEN, fake_service

from cloud_trainer.serve.console.auth import load_tokens
from cloud_trainer.serve.console.server import ConsoleServer
from knet_cli.main import main


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, ConsoleServer]]:
    svc = fake_service(tmp_path)
    svc.fleet.update_state("cam-1", b'{"state": "online", "session": 1}')
    svc.fleet.update_birth("cam-1", b'{"session": 1, "profile": "rpi4", "model_id": "digits",'
                                    b' "model_version": 3}')
    svc.fleet.update_state("cam-2", b'{"state": "stopped", "session": 4}')
    server = ConsoleServer(svc, svc.config.console).start()
    try:
        yield svc, server
    finally:
        server.stop()
        assert server._thread is None


def test_fleet_list_show_watch(served: tuple[Any, ConsoleServer], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import knet_cli.fleet as fleet_cli

    monkeypatch.setattr(fleet_cli, "out", Console(width=200))  # a wide terminal: no wrapping
    _svc, server = served
    token = tmp_path / "token"
    token.write_text(READER_TOKEN + "\n")
    base = ["--url", server.url, "--token-file", str(token)]
    assert main(["fleet", "list", *base, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert {d["device"]: d["state"] for d in body["devices"]} == {"cam-1": "online",
                                                                 "cam-2": "stopped"}
    assert main(["fleet", "list", *base]) == 0
    table = capsys.readouterr().out
    assert "cam-1" in table and "online" in table and "rpi4" in table and "v3" in table
    assert main(["fleet", "show", "cam-1", *base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "rpi4"
    assert main(["fleet", "show", "cam-1", *base]) == 0
    assert "rpi4" in capsys.readouterr().out
    assert main(["fleet", "watch", *base, "--json", "--count", "2", "--interval", "0.1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["fleet"] == "lab"


def test_fleet_says_why_it_failed(served: tuple[Any, ConsoleServer], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _svc, server = served
    monkeypatch.delenv("KNET_CONSOLE_TOKEN", raising=False)
    assert main(["fleet", "list", "--url", server.url]) == 1
    assert "401" in capsys.readouterr().out
    monkeypatch.setenv("KNET_CONSOLE_TOKEN", READER_TOKEN)
    assert main(["fleet", "show", "no-such", "--url", server.url]) == 1
    assert "404" in capsys.readouterr().out
    assert main(["fleet", "show", "../../etc", "--url", server.url]) == 1
    assert "404" in capsys.readouterr().out
    assert main(["fleet", "list", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "knet fleet" in capsys.readouterr().out


def test_console_token_appends_a_hash(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens"
    assert main(["console", "token", "--tokens-file", str(path), "--role", "operator",
                 "--name", "carol"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token not in path.read_text()
    (acc,) = load_tokens(path)
    from cloud_trainer.serve.console.auth import check_token

    assert acc.role == "operator" and acc.name == "carol" and check_token(token, acc.stored)
    assert path.stat().st_mode & 0o077 == 0


def test_the_demo_lab_configures_the_console(tmp_path: Path) -> None:
    """`knet demo` (fleet_lab) writes a valid [console] section and an operator token."""
    from cloud_trainer.release.keys import generate_keypair
    from cloud_trainer.serve.console.auth import Auth
    from cloud_trainer.trainer_config import load_trainer_config
    from knet_lab.fleet import Lab, LabSettings

    lab = Lab(LabSettings(root=tmp_path, console_port=18650))
    lab.root.mkdir(parents=True, exist_ok=True)
    generate_keypair(tmp_path / "keys")
    lab.private_key = tmp_path / "keys" / "knet-update.key"
    lab._write_trainer_config()
    cfg = load_trainer_config(lab.trainer_toml)
    assert cfg.console.enabled and cfg.console.port == 18650 and cfg.console.bind == "127.0.0.1"
    assert lab.console_url == "http://127.0.0.1:18650"
    token = lab.console_token_file.read_text().strip()
    assert token not in cfg.console.tokens_file.read_text()
    acc = Auth.from_file(cfg.console.tokens_file, 60).account(token)
    assert acc is not None and acc.role == "operator"
    assert lab.console_token_file.stat().st_mode & 0o077 == 0
    assert Lab(LabSettings(root=tmp_path / "off")).console_url is None


def test_the_console_stops_within_its_timeout_with_a_live_stream_open(
        served: tuple[Any, ConsoleServer]) -> None:
    import threading
    import time
    import urllib.request

    svc, server = served
    req = urllib.request.Request(server.url + "/events/fleet",
                                 headers={"Authorization": f"Bearer {READER_TOKEN}"})
    first = threading.Event()

    def listen() -> None:
        with urllib.request.urlopen(req, timeout=30) as resp:
            while resp.readline():
                first.set()

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    assert first.wait(10), "no server-sent event"
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < svc.config.console.stop_timeout_s
    reader.join(10)
    assert not reader.is_alive(), "the stream stayed open after the stop"


@pytest.mark.mqtt
def test_the_daemon_serves_the_console_and_stops_promptly(tmp_path: Path,
                                                          mosquitto: Any) -> None:
    """`knet-trainer --config` with [console]: listening once started, answering the API,
    and gone with the process on SIGTERM (exit 0)."""
    import signal
    import time
    import urllib.request

    from console_helpers import console_section
    from mqtt_helpers import read_until
    from trainer_helpers import start_trainer, trainer_toml

    from broker.launcher import free_port

    port = free_port()
    config = trainer_toml(tmp_path, mosquitto.port, ingest={"enabled": False},
                          console=console_section(tmp_path, port=port))
    proc = start_trainer(config)
    try:
        read_until(proc, lambda line: "console listening on" in line, timeout=120)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/fleet",
                                     headers={"Authorization": f"Bearer {READER_TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["fleet"] == "lab"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 20
        with pytest.raises(OSError):
            urllib.request.urlopen(req, timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
