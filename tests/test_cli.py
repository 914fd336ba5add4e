"""The `knet` command line as an operator uses it (no network beyond loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DeviceSection, MqttSection
from cloud_trainer.cli import main


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
