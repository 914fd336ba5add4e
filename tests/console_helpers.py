"""A console over a trainer's real parts (fleet table, registry, run log) without MQTT, for
the HTTP tests; and the token file the console tests log in with."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trainer_helpers import trainer_toml

from cloud_trainer.serve.console.auth import token_line

OPERATOR_TOKEN = "op-token-for-tests-0123456789"
READER_TOKEN = "read-token-for-tests-0123456789"


def write_tokens(path: Path) -> Path:
    path.write_text("# console tokens (hashed)\n"
                    + token_line("operator", "alice", OPERATOR_TOKEN) + "\n"
                    + token_line("read", "bob", READER_TOKEN) + "\n")
    return path


def console_section(tmp: Path, **kw: Any) -> dict[str, Any]:
    return {"enabled": True, "port": 0, "tokens_file": write_tokens(tmp / "tokens"), **kw}


def fake_service(tmp: Path, **console: Any) -> Any:
    """The attributes the console reads, from real objects on a temporary state dir."""
    from cloud_trainer.ingest.fleet import FleetTable
    from cloud_trainer.release.registry import Registry
    from cloud_trainer.release.runs import RunLog
    from cloud_trainer.trainer_config import load_trainer_config

    cfg = load_trainer_config(trainer_toml(
        tmp, 1883, jobs=[{"id": "retrain", "model": "digits", "interval_s": 3600}],
        console=console_section(tmp, **console)))
    reg_dir = cfg.registry_dir
    from cloud_trainer.release.rollout import RolloutPause

    return SimpleNamespace(config=cfg, fleet=FleetTable(), registry=Registry(reg_dir),
                           runs=RunLog(reg_dir), scheduler=None, _run_lock=threading.Lock(),
                           retrainer=SimpleNamespace(
                               pause=RolloutPause(cfg.trainer.state_dir / "rollout.paused")))
