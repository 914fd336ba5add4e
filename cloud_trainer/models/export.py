"""Per-block ONNX export with a partition manifest, for a firmware profile's onnxruntime.

One self-contained ``.onnx`` file per block (input ``input``, output ``output``, dynamic
batch dimension ``batch``) and a ``manifest.json`` (``agent.infer.manifest.PartitionManifest``).
The exporter follows the device's onnxruntime (``target_for_ort``):

- onnxruntime ≥ 1.17: torch 2.13's default (dynamo) exporter, opset 20, IR 10. It writes
  weights to a side ``.onnx.data`` file by default, so we pass ``external_data=False``
  (a device gets one file per block; our blocks are far below the 2 GB protobuf limit).
  ``dynamic_shapes`` with a named ``Dim`` gives the symbolic ``batch`` dimension; it works
  at batch 1 although the example batch is 2 (an example batch of 1 would specialise).
  It logs a warning per missing torchvision op on every call: silenced below.
- onnxruntime < 1.17 (the 1.16.3 wheels of older aarch64 / JetPack 4 images) refuses
  IR 10, and the dynamo exporter cannot write anything older. The TorchScript exporter
  (``dynamo=False``, deprecated but present in 2.13) at opset 17 writes IR 8, with
  ``dynamic_axes`` for the batch. Both exporters give the same operators for our blocks.

Blocks are exported in eval mode: a slice of an ``nn.Sequential`` is a new module in
training mode, and batch norm / dropout would otherwise export their training behaviour.
Every written file is loaded back into onnxruntime, its IR version checked against the
target and its output compared with torch at a batch size other than the export's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from agent.infer.manifest import BlockEntry, PartitionManifest, sha256_file
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.models.blocks import BlockModel

log = logging.getLogger(__name__)

LEGACY_ORT = (1, 17)  # first onnxruntime that reads IR 10
LEGACY_OPSET, CURRENT_OPSET = 17, 20
LEGACY_IR_MAX, CURRENT_IR_MAX = 9, 10


class ExportError(KnetTrainerError, RuntimeError):
    """A block could not be exported for the target, or the file does not match torch."""


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def target_for_ort(version: str | None) -> tuple[int, int]:
    """``(opset, max IR version)`` for a device running onnxruntime ``version``.

    ``None`` means the current onnxruntime (the trainer's own, or an x86 dev box).
    """
    if version is not None and _version_tuple(version) < LEGACY_ORT:
        return LEGACY_OPSET, LEGACY_IR_MAX
    return CURRENT_OPSET, CURRENT_IR_MAX


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


AST_MISMATCH = "AST constructor recursion depth mismatch"
_AST_RETRIES = 3


def _dynamo_export(block: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """The dynamo exporter, retried on CPython 3.11's spurious ``SystemError`` from
    ``ast.parse`` in a thread (cpython gh-106905; onnxscript parses its torchlib functions'
    source on every export, and the trainer exports on its scheduler's thread). Seen once in
    ~50 trainer runs here; nothing else is retried."""
    for attempt in range(1, _AST_RETRIES + 1):
        try:
            program = torch.onnx.export(
                block, (example,), input_names=["input"], output_names=["output"],
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
            )
            return program.model_proto
        except SystemError as exc:
            if AST_MISMATCH not in str(exc) or attempt == _AST_RETRIES:
                raise
            log.warning("export hit CPython's spurious AST SystemError (gh-106905); "
                        "retrying (%d/%d)", attempt, _AST_RETRIES - 1)
    raise AssertionError("unreachable")


def export_block(block: torch.nn.Module, input_shape: tuple[int, ...], path: Path, *,
                 opset: int, ir_max: int = CURRENT_IR_MAX) -> onnx.ModelProto:
    """One block to one self-contained ONNX file with a dynamic batch dimension.

    ``ir_max < 10`` selects the TorchScript exporter (the only one writing IR ≤ 9).
    """
    block = block.eval()
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        if ir_max < 10:
            buf = io.BytesIO()
            torch.onnx.export(block, (example,), buf, input_names=["input"],
                              output_names=["output"], opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            model = onnx.load_from_string(buf.getvalue())
        else:
            model = _dynamo_export(block, example, opset)
    if model.ir_version > ir_max:
        raise ExportError(f"{path.name}: exporter wrote IR {model.ir_version}, target allows "
                          f"≤ {ir_max}")
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return model


def verify_block(block: torch.nn.Module, input_shape: tuple[int, ...], path: Path, *,
                 batch: int = 3, rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Load ``path`` in onnxruntime and compare with torch at ``batch``; max abs diff."""
    import onnxruntime as ort

    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block.eval()(x).numpy()
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(["output"], {"input": x.numpy()})[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{path.name}: onnxruntime cannot run it: {exc}") from None
    # float32 rounding grows with the activations' size: scale the absolute bound by it
    atol = atol * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if out.shape != ref.shape or not np.allclose(out, ref, rtol=rtol, atol=atol):
        diff = float(np.abs(out - ref).max()) if out.shape == ref.shape else float("inf")
        raise ExportError(f"{path.name}: onnxruntime output {out.shape} differs from torch "
                          f"{ref.shape} (max abs diff {diff:.3g})")
    return float(np.abs(out - ref).max())


def export_partition(model: BlockModel, out_dir: Path | str, *, model_id: str,
                     model_version: int, first: int = 1, last: int | None = None,
                     role: str = "student", profile_ort_version: str | None = None,
                     opset: int | None = None, ort_version: str | None = None,
                     file_names: str = "block-{index:02d}.onnx",
                     verify: bool = True) -> PartitionManifest:
    """Export blocks ``first..last`` and write ``manifest.json`` beside them.

    ``profile_ort_version`` (the firmware profile's ``onnxruntime``) picks the exporter and
    opset; ``opset`` overrides the opset only. ``ort_version`` is the older name of
    ``profile_ort_version``, kept for existing callers.
    """
    if ort_version is not None and profile_ort_version is not None:
        raise TypeError("give profile_ort_version or ort_version, not both")
    target = profile_ort_version if profile_ort_version is not None else ort_version
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = model.num_blocks if last is None else last
    if not 1 <= first <= last <= model.num_blocks:
        raise ExportError(f"blocks {first}..{last} not within 1..{model.num_blocks}")
    default_opset, ir_max = target_for_ort(target)
    opset = opset or default_opset
    was_training = model.training
    model.eval()
    entries = []
    ir_version = 0
    try:
        for i in range(first, last + 1):
            path = out / file_names.format(index=i)
            shape = model.boundary_shapes[i - 1]
            proto = export_block(model.block(i), shape, path, opset=opset, ir_max=ir_max)
            if verify:
                verify_block(model.block(i), shape, path)
            ir_version = max(ir_version, proto.ir_version)
            entries.append(BlockEntry(
                index=i, file=path.name, sha256=sha256_file(path), size=path.stat().st_size,
                input_shape=shape, output_shape=model.boundary_shapes[i],
                params=model.params(i),
            ))
    finally:
        model.train(was_training)
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
                       role: str = "student", model_version: int = 1,
                       weights: Path | str | None = None,
                       input_shape: Sequence[int] | str | None = None,
                       cuts: str | Sequence[str] | None = None) -> PartitionManifest:
    """Export one model of a pair for a profile.

    ``model_name`` is a zoo name (trained, or loaded from the cache) or an import path
    ``package.module:factory`` (``cloud_trainer.models.zoo.refs``; a teacher alone is its own
    student). ``cuts`` re-cuts the model at traced candidates (``cloud_trainer.models.cuts``;
    for a factory's plain module it is the cut selection, default ``modules``).
    """
    from agent.infer.profiles import load_profile
    from cloud_trainer.models.zoo.refs import DEFAULT_CUTS, cut_module, load_ref

    prof = load_profile(profile)
    loaded = load_ref(model_name, seed=seed, weights=weights, input_shape=input_shape,
                      role=role)
    if cuts is not None and (loaded.pair is not None or loaded.teacher is not None):
        model = cut_module(*loaded.network(role), cuts)
    else:
        pair = loaded.as_pair(cuts if cuts is not None else DEFAULT_CUTS)
        model = pair.student if role == "student" else pair.teacher
    manifest = export_partition(model, out, model_id=loaded.model_id,
                                model_version=model_version, role=role,
                                profile_ort_version=prof.onnxruntime)
    if not prof.supports_ir(manifest.ir_version):
        raise ExportError(f"profile {prof.name} reads IR ≤ {prof.max_ir_version}, export "
                          f"wrote IR {manifest.ir_version}; fix the profile's onnxruntime")
    return manifest
