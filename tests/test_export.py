"""Per-block ONNX export: every zoo block, both onnxruntime targets, parity with torch."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from agent.infer.manifest import ManifestError, PartitionManifest, sha256_file
from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.models.export import ExportError, export_partition, target_for_ort, verify_block
from cloud_trainer.models.zoo import get_pair, zoo_names

# target name -> (the profile's onnxruntime, expected opset, highest IR allowed)
TARGETS = {"ort-1.16": ("1.16.3", 17, 9), "ort-current": (None, 20, 10)}


def test_target_follows_the_devices_onnxruntime() -> None:
    assert target_for_ort("1.16.3") == (17, 9)
    assert target_for_ort("1.16") == (17, 9)
    assert target_for_ort("1.17.0") == (20, 10)
    assert target_for_ort("1.20.1") == (20, 10)
    assert target_for_ort(None) == (20, 10)


def _check_files(out: Path, manifest: PartitionManifest, opset: int, ir_max: int) -> None:
    assert PartitionManifest.load(out / "manifest.json") == manifest
    manifest.verify_files(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [b.file for b in manifest.blocks] + ["manifest.json"])  # no .onnx.data side files
    assert manifest.opset == opset and manifest.ir_version <= ir_max
    for b in manifest.blocks:
        proto = onnx.load(out / b.file)
        assert proto.ir_version <= ir_max
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
        assert [i.name for i in proto.graph.input] == ["input"]
        assert [o.name for o in proto.graph.output] == ["output"]
        batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value  # a symbolic (dynamic) batch
        assert b.size == (out / b.file).stat().st_size
        assert b.sha256 == sha256_file(out / b.file)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", zoo_names())
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_every_block_matches_torch(tmp_path: Path, name: str, target: str, role: str) -> None:
    ort_version, opset, ir_max = TARGETS[target]
    pair = get_pair(name, seed=1)
    model = getattr(pair, role)
    model.train()  # export must put every block in eval mode itself
    manifest = export_partition(model, tmp_path, model_id=name, model_version=1, role=role,
                                profile_ort_version=ort_version)
    assert model.training  # and give the caller's mode back
    model.eval()
    _check_files(tmp_path, manifest, opset, ir_max)
    assert manifest.is_complete and manifest.num_classes == pair.num_classes
    assert [b.params for b in manifest.blocks] == [model.params(i) for i in
                                                   range(1, model.num_blocks + 1)]
    for batch in (1, 32):
        x = torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            acts = model.boundaries(x)
        for b in manifest.blocks:
            sess = ort.InferenceSession(str(tmp_path / b.file), providers=["CPUExecutionProvider"])
            out = sess.run(None, {"input": acts[b.index - 1].numpy()})[0]
            assert out.shape == (batch, *b.output_shape)
            ref = acts[b.index].numpy()
            # float32 rounding grows with the activations (EfficientNet's reach ~15)
            bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
            assert np.abs(out - ref).max() <= bound, (b.index, batch)


def test_partial_partition_manifest_and_tampering(tmp_path: Path) -> None:
    model = get_pair("digits").student
    m = export_partition(model, tmp_path, model_id="digits", model_version=3, first=2, last=3,
                         profile_ort_version="1.16.3")
    assert (m.first, m.last, m.is_complete) == (2, 3, False)
    assert (m.opset, m.ir_version) == (17, 8)
    assert m.block(2).input_shape == (16, 8, 8)
    assert sum(b.params for b in m.blocks) == model.params(2) + model.params(3)
    path = tmp_path / m.block(3).file
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        m.verify_files(tmp_path)
    with pytest.raises(ExportError):
        export_partition(model, tmp_path, model_id="digits", model_version=3, first=3, last=5)


def test_the_older_keyword_still_selects_the_target(tmp_path: Path) -> None:
    model = get_pair("digits").student
    m = export_partition(model, tmp_path, model_id="digits", model_version=1, first=4,
                         ort_version="1.16.3")
    assert m.ir_version <= 9
    with pytest.raises(TypeError):
        export_partition(model, tmp_path, model_id="digits", model_version=1,
                         ort_version="1.16.3", profile_ort_version="1.16.3")


def test_a_users_model_exports_for_both_targets(tmp_path: Path) -> None:
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    model = BlockModel.from_sequential(seq, cuts=[3], input_shape=(3, 8, 8))
    for target, (ort_version, opset, ir_max) in TARGETS.items():
        out = tmp_path / target
        m = export_partition(model, out, model_id="byo", model_version=1,
                             profile_ort_version=ort_version)
        _check_files(out, m, opset, ir_max)
        x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
        sessions = [ort.InferenceSession(str(out / b.file), providers=["CPUExecutionProvider"])
                    for b in m.blocks]
        y = x
        for s in sessions:
            y = s.run(None, {"input": y})[0]
        with torch.no_grad():
            ref = model.eval()(torch.from_numpy(x)).numpy()
        assert np.abs(y - ref).max() <= 1e-4


def test_verification_catches_a_file_that_is_not_the_block(tmp_path: Path) -> None:
    model = BlockModel([nn.Linear(4, 4), nn.Linear(4, 4)], input_shape=(4,))
    m = export_partition(model, tmp_path, model_id="toy", model_version=1,
                         profile_ort_version="1.16.3")
    with pytest.raises(ExportError, match="differs"):
        verify_block(model.block(2), (4,), tmp_path / m.block(1).file)


def test_the_dynamo_export_retries_cpythons_spurious_ast_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython 3.11's ``ast.parse`` can raise a spurious SystemError in a thread (gh-106905):
    the export is retried for that error alone."""
    import cloud_trainer.models.export as ex

    real, calls = torch.onnx.export, []

    def flaky(*a: object, **kw: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise SystemError(f"{ex.AST_MISMATCH} (before=165, after=30)")
        return real(*a, **kw)

    monkeypatch.setattr(torch.onnx, "export", flaky)
    block = get_pair("digits").student.block(4)
    proto = ex.export_block(block, (64,), tmp_path / "b.onnx", opset=20)
    assert len(calls) == 2 and proto.graph.output[0].name == "output"

    def broken(*a: object, **kw: object) -> object:
        raise SystemError("something else")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(SystemError, match="something else"):
        ex.export_block(block, (64,), tmp_path / "c.onnx", opset=20)
