"""The `knet` command line as an operator uses it (no network beyond loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DeviceSection, MqttSection
from knet_cli.main import main


def test_broker_provision_prints_a_valid_agent_snippet_and_revoke_removes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    d = tmp_path / "fleet"
    assert main(["broker", "provision", "cam-1", "--fleet", "lab", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    snippet = tomllib.loads(out.split("\n", 1)[1])
    DeviceSection.model_validate(snippet["device"])
    MqttSection.model_validate(snippet["mqtt"])
    assert "cam-1" in (d / "passwd").read_text()
    assert main(["broker", "revoke", "cam-1", "--dir", str(d)]) == 0
    assert "cam-1" not in (d / "passwd").read_text()
    assert main(["broker", "revoke", "nobody", "--dir", str(d)]) == 1


def test_keys_gen_writes_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    assert main(["keys", "gen", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "knet-update.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "knet-update.pub").exists()


def test_keys_gen_twice_refuses_in_one_line_and_keeps_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "gen", "--dir", str(tmp_path)]) == 0
    key = (tmp_path / "knet-update.key").read_bytes()
    capsys.readouterr()
    assert main(["keys", "gen", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("knet keys gen: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "refusing to overwrite" in err
    assert (tmp_path / "knet-update.key").read_bytes() == key


def test_broker_provision_trainer_prints_a_snippet_knet_trainer_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented path: `knet broker provision --trainer` output merged into a
    trainer.toml with a signing key and a model loads with knet-trainer's loader."""
    from cloud_trainer.trainer_config import load_trainer_config

    d = tmp_path / "fleet"
    assert main(["broker", "provision", "trainer-1", "--trainer", "--fleet", "lab",
                 "--dir", str(d)]) == 0
    printed = capsys.readouterr().out
    snippet = printed.split("\n", 1)[1]  # after the "# trainer trainer-1: ..." line
    assert main(["keys", "gen", "--dir", str(tmp_path / "keys")]) == 0
    bundle = d / "credentials" / "trainer-1"
    text = snippet.replace("[trainer]\n", "[trainer]\nsigning_key_file = "
                           f'"{tmp_path / "keys" / "knet-update.key"}"\n', 1)
    (bundle / "trainer.toml").write_text(text + '\n[models.digits]\nzoo = "digits"\n')
    cfg = load_trainer_config(bundle / "trainer.toml")
    assert cfg.trainer.fleet == "lab" and cfg.mqtt.username == "trainer-1"
    assert cfg.mqtt.connection_accounts and cfg.mqtt.resolve_password()


def test_broker_provision_extra_connection_gets_its_own_username(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    assert main(["broker", "provision", "cam-1", "--fleet", "lab", "--dir", str(d),
                 "--connection", "camera"]) == 0
    assert "cam-1.camera:$7$" in (d / "passwd").read_text()
    assert "user cam-1.camera" in (d / "knet.acl").read_text()
    assert main(["broker", "revoke", "cam-1", "--dir", str(d)]) == 0
    assert "cam-1" not in (d / "passwd").read_text()


def test_without_the_lab_and_the_benchmarks_knet_says_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The trainer image ships knet_cli but neither knet_lab nor bench (Dockerfile): the
    other commands still work, and those two name what is missing in one line."""
    import sys

    for name in ("knet_lab", "knet_lab.demo", "bench", "bench.codec"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails
    assert main(["demo"]) == 2
    assert main(["bench", "codec"]) == 2
    err = capsys.readouterr().err
    assert "knet demo: this installation lacks knet_lab, the lab" in err
    assert "knet bench: this installation lacks bench, the benchmarks" in err
    assert "Traceback" not in err
    assert main(["keys", "gen", "--dir", str(tmp_path)]) == 0


def test_bench_ingest_refuses_a_page_size_the_replicas_would_ignore(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ingest", "--store", "sqlite", "--page-size", "4096"]) == 2
    assert "--page-size compares the one-process bench's store" in capsys.readouterr().err
