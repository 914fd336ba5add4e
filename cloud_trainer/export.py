"""Per-block ONNX export with a partition manifest, for a firmware profile's onnxruntime.

Two exporters, chosen by the device's onnxruntime:
- onnxruntime ≥ 1.17: torch's default (dynamo) exporter, opset 20, IR 10, with
  ``external_data=False`` — by default it writes the weights to a side ``.onnx.data`` file,
  and a device must get one self-contained file per block.
- onnxruntime < 1.17 (the 1.16.3 wheels of older aarch64/JetPack images) refuses IR 10, so
  we use the TorchScript exporter (``dynamo=False``) at opset 17, which writes IR 8.
Both give a dynamic batch dimension. Blocks are exported in eval mode: a slice of an
``nn.Sequential`` is a new module in training mode, and batch norm would otherwise export
its training behaviour.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from agent.manifest import BlockEntry, PartitionManifest, sha256_file
from cloud_trainer.blocks import BlockModel

log = logging.getLogger(__name__)

LEGACY_ORT = (1, 17)  # first onnxruntime that reads IR 10
LEGACY_OPSET, CURRENT_OPSET = 17, 20


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def target_for_ort(ort_version: str | None) -> tuple[int, int]:
    """``(opset, max IR version)`` a device running this onnxruntime can load."""
    if ort_version is not None and _version_tuple(ort_version) < LEGACY_ORT:
        return LEGACY_OPSET, 9
    return CURRENT_OPSET, 10


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per missing torchvision op on every call."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_block(block: torch.nn.Module, input_shape: tuple[int, ...], path: Path, *,
                 opset: int) -> onnx.ModelProto:
    """One block to one self-contained ONNX file with a dynamic batch dimension."""
    block = block.eval()
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        if opset <= LEGACY_OPSET:
            buf = io.BytesIO()
            torch.onnx.export(block, (example,), buf, input_names=["input"],
                              output_names=["output"], opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            model = onnx.load_from_string(buf.getvalue())
        else:
            program = torch.onnx.export(
                block, (example,), input_names=["input"], output_names=["output"],
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
            )
            model = program.model_proto
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return model


def export_partition(model: BlockModel, out_dir: Path | str, *, model_id: str,
                     model_version: int, first: int = 1, last: int | None = None,
                     role: str = "student", ort_version: str | None = None,
                     file_names: str = "block-{index:02d}.onnx") -> PartitionManifest:
    """Export blocks ``first..last`` and write ``manifest.json`` beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = model.num_blocks if last is None else last
    opset, _ = target_for_ort(ort_version)
    model.eval()
    entries = []
    ir_version = 0
    for i in range(first, last + 1):
        path = out / file_names.format(index=i)
        proto = export_block(model.block(i), model.boundary_shapes[i - 1], path, opset=opset)
        ir_version = max(ir_version, proto.ir_version)
        entries.append(BlockEntry(
            index=i, file=path.name, sha256=sha256_file(path), size=path.stat().st_size,
            input_shape=model.boundary_shapes[i - 1], output_shape=model.boundary_shapes[i],
            params=model.params(i),
        ))
    manifest = PartitionManifest(
        model_id=model_id, model_version=model_version, role=role, opset=opset,
        ir_version=ir_version, num_blocks=model.num_blocks, num_classes=model.num_classes,
        boundaries=model.boundary_shapes, blocks=tuple(entries),
    )
    manifest.dump(out / "manifest.json")
    log.info("exported %s v%d blocks %d..%d (opset %d, IR %d) to %s",
             model_id, model_version, first, last, opset, ir_version, out)
    return manifest


def export_for_profile(model_name: str, profile: str, out: Path, *, seed: int = 0,
                       role: str = "student", model_version: int = 1) -> PartitionManifest:
    """Train (or load from cache) a zoo pair and export one of its models for a profile."""
    from agent.profiles import load_profile
    from cloud_trainer.train import trained_pair

    prof = load_profile(profile)
    pair = trained_pair(model_name, seed=seed)
    model = pair.student if role == "student" else pair.teacher
    return export_partition(model, out, model_id=model_name, model_version=model_version,
                            role=role, ort_version=prof.onnxruntime)
