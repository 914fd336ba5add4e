"""Real signed updates of the digits student for the updater tests and ``knet bench update``:
exported versions with chosen changes, signed by an operator key, and an in-process agent."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import load_config
from agent.infer.manifest import PartitionManifest
from agent.service import Agent
from agent.update.update_manifest import SignedManifest, Targets
from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.release.keys import sign_manifest
from cloud_trainer.release.publisher import make_update

FLEET = "lab"
CHUNK = 4096  # the smallest chunking: the 131 KB block 3 becomes 33 chunks

Transform = Callable[[BlockModel], None]


def write_public_key(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def digits_model(transform: Transform | None = None) -> BlockModel:
    """The (untrained, deterministic) digits student, optionally changed in place."""
    from cloud_trainer.models.zoo import get_pair

    model = copy.deepcopy(get_pair("digits").student)
    if transform is not None:
        with torch.no_grad():
            transform(model)
    return model


def scale_head(factor: float) -> Transform:
    """Logits times ``factor``: the same top-1 everywhere, the confidence changed."""
    def apply(model: BlockModel) -> None:
        head = model.block(4)[0]
        head.weight.mul_(factor)
        head.bias.mul_(factor)
    return apply


def perturb(blocks: tuple[int, ...], scale: float = 0.05, seed: int = 1) -> Transform:
    """Multiply the weights of ``blocks`` by ``1 + scale * noise``: a small retraining."""
    def apply(model: BlockModel) -> None:
        g = torch.Generator().manual_seed(seed)
        for i in blocks:
            for p in model.block(i).parameters():
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))
    return apply


def nan_head(model: BlockModel) -> None:
    model.block(4)[0].weight.fill_(float("nan"))


def export_version(out: Path, version: int, transform: Transform | None = None
                   ) -> PartitionManifest:
    from cloud_trainer.models.export import export_partition

    if (out / "manifest.json").is_file():
        return PartitionManifest.load(out / "manifest.json")
    model = digits_model(transform)
    verify = transform is not nan_head  # onnx vs torch comparison cannot pass on NaN
    return export_partition(model, out, model_id="digits", model_version=version,
                            ort_version="1.16.3", verify=verify)


def signed_update(part: PartitionManifest, directory: Path, key: Ed25519PrivateKey, *,
                  rollback: bool = False, targets: Targets | None = None
                  ) -> tuple[SignedManifest, dict[str, Path]]:
    manifest, files = make_update(FLEET, part.model_id, part.model_version,
                                  {"": (part, directory)}, targets, rollback,
                                  chunk_size=CHUNK)
    return sign_manifest(manifest, key), files


def agent_toml(tmp: Path, port: int, manifest: Path, key_file: Path | None, *,
               device: str = "dev-1", source: dict[str, Any] | None = None,
               update: dict[str, Any] | None = None, health: dict[str, Any] | None = None,
               uplink: dict[str, Any] | None = None, mqtt: dict[str, Any] | None = None,
               tls_ca: Path | None = None) -> Path:
    """An agent.toml with a fast-polling ``[update]`` section for tests."""
    from agent_helpers import agent_config, write_config

    upd: dict[str, Any] = {"enabled": True, "request_interval_s": 0.5,
                           "first_request_after_s": 0.3, "download_timeout_s": 20,
                           "min_canary_inputs": 4}
    if key_file is not None:
        upd["public_keys"] = [key_file]
    else:
        upd["allow_unsigned"] = True
    upd.update(update or {})
    path = agent_config(tmp, port, manifest, device=device,
                        source=source or {"kind": "npz", "path": tmp / "inputs.npz",
                                          "rate_hz": 200, "loop": True},
                        uplink=uplink or {"boundaries": [4], "codec": "raw"},
                        mqtt=mqtt or {})
    text = path.read_text()
    sections = {"update": upd, "update.health": {"watch_s": 0, **(health or {})}}
    if tls_ca is not None:
        sections["mqtt.tls"] = {"ca_file": tls_ca}
    extra = tmp / f"{device}-update.toml"
    write_config(extra, sections)
    path.write_text(text + "\n" + extra.read_text())
    return path


@contextmanager
def running_agent(config: Path, *, connect: bool = True) -> Iterator[Agent]:
    """An ``Agent`` running in a thread of this process, stopped cleanly afterwards."""
    agent = Agent(load_config(config), config_path=config)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    thread.start()
    try:
        if connect:
            assert agent.link.wait_connected(10), "agent did not connect"
        yield agent
    finally:
        agent.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "agent did not stop"


def reports(payloads: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads]


class Versions:
    """The exported digits versions the update tests use (built once per session)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = Ed25519PrivateKey.generate()
        self.pub = write_public_key(self.key, root / "operator.pub")
        self.other_key = Ed25519PrivateKey.generate()  # a key no device trusts

    def get(self, name: str) -> tuple[PartitionManifest, Path]:
        version, transform = _VERSIONS[name]
        out = self.root / name
        return export_version(out, version, transform), out


_VERSIONS: dict[str, tuple[int, Transform | None]] = {
    "v1": (1, None),
    "v2-head": (2, scale_head(1.02)),  # block 4 only
    "v2-full": (2, perturb((1, 2, 3, 4))),  # every block
    "v2-nan": (2, nan_head),
    "v3-head": (3, scale_head(1.05)),
    "v1-other": (1, scale_head(1.03)),  # other blocks under the running version number
    "v1-confident": (1, scale_head(20.0)),
    "v2-unsure": (2, scale_head(0.01)),  # same top-1 as v1-confident, confidence collapsed
}
_CACHE: dict[str, Versions] = {}


def versions(root_factory: Callable[[], Path]) -> Versions:
    if "v" not in _CACHE:
        _CACHE["v"] = Versions(root_factory())
    return _CACHE["v"]
