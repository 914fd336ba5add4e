"""Build a real trainer deployment for tests: keys, trainer.toml, a degraded deployed student,
stored boundary activations, and the daemon as a child process."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.wire.codec import encode
from agent.wire.envelope import Envelope
from cloud_trainer.models.blocks import BlockModel

REPO = Path(__file__).resolve().parent.parent
FLEET = "lab"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(i) for i in v) + "]"
    return repr(v)


def _table(name: str, values: dict[str, Any], array: bool = False) -> list[str]:
    head = f"[[{name}]]" if array else f"[{name}]"
    lines = [head]
    subs = []
    for k, v in values.items():
        if isinstance(v, dict):
            subs.append((f"{name}.{k}", v))
        elif v is not None:
            lines.append(f"{k} = {_value(v)}")
    for sub_name, sub in subs:
        lines += _table(sub_name, sub)
    return [*lines, ""]


def trainer_toml(tmp: Path, port: int, *, jobs: list[dict[str, Any]] | None = None,
                 **sections: dict[str, Any]) -> Path:
    """A trainer.toml for a private broker; ``sections`` override/extend top-level tables."""
    key = tmp / "keys" / "knet-update.key"
    if not key.exists():
        from cloud_trainer.release.keys import generate_keypair

        generate_keypair(tmp / "keys")
    base: dict[str, dict[str, Any]] = {
        "trainer": {"id": "trainer-t", "fleet": FLEET, "state_dir": tmp / "state",
                    "signing_key_file": key, "log_format": "json"},
        "mqtt": {"host": "127.0.0.1", "port": port, "connect_timeout_s": 5},
        "models.digits": {"zoo": "digits", "seed": 0, "profiles": ["x86-dev"]},
        "rollout": {"success_timeout_s": 20},
    }
    for name, values in sections.items():
        base.setdefault(name.replace("__", "."), {}).update(values)
    lines: list[str] = []
    for name, values in base.items():
        lines += _table(name, values)
    for job in jobs or []:
        lines += _table("jobs", job, array=True)
    path = tmp / "trainer.toml"
    path.write_text("\n".join(lines))
    return path


def job(job_id: str = "retrain", **kw: Any) -> dict[str, Any]:
    training = {"epochs": 8, "lr": 3e-3, **kw.pop("training", {})}
    out = {"id": job_id, "model": "digits", "interval_s": 3600, "min_new_samples": 100,
           "misfire_grace_s": 60, **kw, "training": training}
    return out


def degraded_student(student: BlockModel, block: int = 3, scale: float = 0.6,
                     seed: int = 0) -> BlockModel:
    """The zoo student with noise on one block's weights (a drifted/damaged deployment)."""
    out = copy.deepcopy(student).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.block(block).parameters():
            if p.ndim > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return out


def register_deployed(state_dir: Path, student: BlockModel, model_id: str = "digits") -> None:
    """What the fleet runs as v1 (here: a degraded student), so the trainer does not
    register the zoo student itself."""
    from cloud_trainer.release.registry import Registry

    reg = Registry(state_dir / "registry")
    reg.add_version(model_id, [student.block(i).state_dict()
                               for i in range(1, student.num_blocks + 1)],
                    status="pushed", reason="test deployment")


def deploy_damaged_digits(tmp: Path) -> BlockModel:
    """A fleet that runs a damaged digits student (block 3 scaled noise) as v1, so that a
    retraining run improves it: registered in ``tmp/state`` and exported for the x86-dev
    profile into ``tmp/model`` (the agent's model directory). Returns the deployed student."""
    import shutil

    from agent.infer.profiles import load_profile
    from cloud_trainer.models.data import digits_splits
    from cloud_trainer.models.export import target_for_ort
    from cloud_trainer.models.zoo import get_pair
    from cloud_trainer.training.distill import train_student_blockwise_from_inputs
    from cloud_trainer.training.retrain import ExportCache
    from cloud_trainer.training.train import trained_pair

    pair = trained_pair("digits")
    kt = train_student_blockwise_from_inputs(pair.teacher, get_pair("digits", 0).student,
                                             digits_splits().x_train,
                                             inputs="student+boundary", epochs=10).student
    deployed = degraded_student(kt, block=3, scale=6.0)
    state = tmp / "state"
    register_deployed(state, deployed)
    ort = load_profile("x86-dev").onnxruntime
    _part, src = ExportCache(state / "exports").partition(deployed, "digits", 1,
                                                          target_for_ort(ort), ort)
    shutil.copytree(src, tmp / "model")
    return deployed


def boundary_envelopes(student: BlockModel, x: np.ndarray, boundary: int, *,
                       device: str = "cam-1", session: int = 1, start: int = 0,
                       version: int = 1) -> list[Envelope]:
    """What a device running ``student`` uplinks at ``boundary`` for inputs ``x``."""
    with torch.no_grad():
        acts = student.boundaries(torch.from_numpy(np.array(x, np.float32)))[boundary]
    out = []
    for i, a in enumerate(acts.numpy()):
        out.append(Envelope(device=device, session=session, seq=start + i,
                            timestamp=time.time(), model_version=version, boundary=boundary,
                            payload=encode(a[None], "uint8+lz4" if boundary else "raw"),
                            meta={"model": "digits"}))
    return out


def store_samples(state_dir: Path, envelopes: list[Envelope]) -> int:
    from cloud_trainer.ingest.store import SQLiteSampleStore

    store = SQLiteSampleStore(state_dir / "store")
    try:
        return store.add_many(envelopes)
    finally:
        store.close()


def start_trainer(config: Path, *args: str) -> subprocess.Popen[str]:
    """``knet-trainer --config`` as a child process (stdout+stderr to a pipe)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cloud_trainer.trainer_cli", "--config",
                             str(config), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trainer_cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cloud_trainer.trainer_cli", "--config",
                           str(config), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
