"""Every zoo block, exported for both onnxruntime targets, matches torch within 1e-4."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from agent.manifest import PartitionManifest, sha256_file
from cloud_trainer.export import export_partition, target_for_ort
from cloud_trainer.zoo import get_pair, zoo_names

TARGETS = {"ort-1.16": "1.16.3", "ort-current": None}


def test_target_follows_the_devices_onnxruntime() -> None:
    assert target_for_ort("1.16.3") == (17, 9)
    assert target_for_ort("1.17.0") == (20, 10)
    assert target_for_ort(None) == (20, 10)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", zoo_names())
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_every_block_matches_torch(tmp_path: Path, name: str, target: str, role: str) -> None:
    pair = get_pair(name, seed=1)
    model = getattr(pair, role).eval()
    manifest = export_partition(model, tmp_path, model_id=name, model_version=1, role=role,
                                ort_version=TARGETS[target])
    assert PartitionManifest.load(tmp_path / "manifest.json") == manifest
    manifest.verify_files(tmp_path)
    assert not list(tmp_path.glob("*.data"))  # one self-contained file per block
    for batch in (1, 32):
        x = torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            acts = model.boundaries(x)
        for b in manifest.blocks:
            proto = onnx.load(tmp_path / b.file)
            assert proto.ir_version <= (9 if target == "ort-1.16" else 10)
            sess = ort.InferenceSession(str(tmp_path / b.file), providers=["CPUExecutionProvider"])
            out = sess.run(None, {"input": acts[b.index - 1].numpy()})[0]
            assert out.shape == (batch, *b.output_shape)
            assert np.abs(out - acts[b.index].numpy()).max() <= 1e-4, (b.index, batch)


def test_partial_partition_manifest(tmp_path: Path) -> None:
    model = get_pair("digits").student
    m = export_partition(model, tmp_path, model_id="digits", model_version=3, first=2, last=3,
                         ort_version="1.16.3")
    assert (m.first, m.last, m.is_complete) == (2, 3, False)
    assert m.blocks[0].sha256 == sha256_file(tmp_path / m.blocks[0].file)
    assert m.block(2).input_shape == (16, 8, 8)
    assert sum(b.params for b in m.blocks) == model.params(2) + model.params(3)
