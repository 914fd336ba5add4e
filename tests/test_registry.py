from pathlib import Path

import pytest
import torch
from torch import nn

from cloud_trainer.release.registry import Registry, RegistryError, weights_digest


class Chain(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 3)])

    def block(self, i: int) -> nn.Module:
        return self.blocks[i - 1]


def states(m: Chain) -> list[dict[str, torch.Tensor]]:
    return [b.state_dict() for b in m.blocks]


def test_versions_are_numbered_and_blocks_shared_by_content(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    a = Chain(0)
    v1 = reg.add_version("digits", states(a), status="pushed")
    with torch.no_grad():
        a.blocks[1].weight.add_(1.0)
    v2 = reg.add_version("digits", states(a), parent=1, window={"since": 5})
    assert (v1.version, v2.version) == (1, 2)
    assert v2.blocks[1] == v1.blocks[1] and v2.blocks[2] != v1.blocks[2]
    assert v2.changed_blocks(v1) == [2]
    assert len(list((tmp_path / "blocks").glob("*.pt"))) == 3
    assert reg.get("digits", 2).window == {"since": 5}


def test_one_pushed_version_at_a_time_and_rollback_is_a_new_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1 = reg.add_version("m", states(Chain(0)), status="pushed")
    v2 = reg.add_version("m", states(Chain(1)), parent=1)
    reg.set_status("m", v2.version, "pushed")
    assert reg.deployed("m").version == 2
    assert reg.get("m", 1).status == "superseded"
    v3 = reg.rollback("m", 1)
    assert v3.version == 3 and v3.blocks == v1.blocks and v3.info["rollback_of"] == 1
    model = reg.load_into(Chain(5), v3)
    assert weights_digest(model.block(1).state_dict()) == v1.blocks[1]


def test_registry_survives_reopen_and_detects_corrupted_weights(tmp_path: Path) -> None:
    v1 = Registry(tmp_path).add_version("m", states(Chain(0)), scores={"acc": 0.9})
    reg = Registry(tmp_path)
    assert reg.versions("m")[0].scores == {"acc": 0.9}
    path = tmp_path / "blocks" / f"{v1.blocks[1]}.pt"
    state = torch.load(path, weights_only=True)
    state["weight"] += 1
    torch.save(state, path)
    with pytest.raises(RegistryError, match="corrupted"):
        reg.load_block(v1.blocks[1])
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.get("m", 9)
    with pytest.raises(RegistryError, match="status"):
        reg.set_status("m", 1, "bogus")


def test_knet_trainer_models_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cloud_trainer.trainer_cli import main

    reg = Registry(tmp_path)
    reg.add_version("digits", states(Chain(0)), status="pushed")
    reg.add_version("digits", states(Chain(1)), parent=1, status="rejected", reason="gate")
    assert main(["--registry", str(tmp_path), "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "rejected" in out and "gate" in out
    assert main(["--registry", str(tmp_path), "models", "show", "digits", "2"]) == 0
    assert '"status": "rejected"' in capsys.readouterr().out
    assert main(["--registry", str(tmp_path), "models", "rollback", "digits", "1"]) == 0
    assert reg.get("digits", 3).info == {"rollback_of": 1}
    assert main(["--registry", str(tmp_path), "models", "show", "digits", "9"]) == 2
