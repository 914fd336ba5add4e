"""onnxruntime sessions for a partition: the only inference engine on a device.

A ``BlockRunner`` is immutable once built: an update builds a new one beside the running
one, self-tests it, and swaps the reference (``agent.pipeline.RunnerSlot``), so an input is
never processed by a half-updated chain.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.manifest import ManifestError, PartitionManifest
from agent.profiles import FirmwareProfile

log = logging.getLogger(__name__)


class InputError(ValueError):
    """An input of the wrong shape or dtype, or not finite; it is skipped and counted."""


class PartitionError(ValueError):
    """A partition that cannot run on this device; the text says what to change."""


def choose_providers(profile: FirmwareProfile) -> list[str]:
    """The profile's providers in order of preference, minus those this build lacks."""
    available = set(ort.get_available_providers())
    chosen = [p for p in profile.execution_providers if p in available]
    missing = [p for p in profile.execution_providers if p not in available]
    if missing:
        log.warning("execution providers %s are not in this onnxruntime build (%s); "
                    "falling back to %s", missing, ort.__version__,
                    chosen or ["CPUExecutionProvider"])
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def check_partition(manifest: PartitionManifest, base_dir: Path,
                    profile: FirmwareProfile) -> dict[int, Path]:
    """Refuse, with the reason, a partition that is missing, altered or does not fit."""
    try:
        paths = manifest.verify_files(base_dir)
    except ManifestError as exc:
        raise PartitionError(str(exc)) from None
    if not profile.supports_ir(manifest.ir_version):
        raise PartitionError(
            f"partition {manifest.model_id} v{manifest.model_version} is ONNX IR "
            f"{manifest.ir_version}, but profile {profile.name} (onnxruntime "
            f"{profile.onnxruntime}) reads IR <= {profile.max_ir_version}: re-export it for "
            f"this profile (knet export --profile {profile.name})")
    # A session holds the weights plus roughly as much again in arenas and optimised copies.
    need_mb = 2 * sum(b.size for b in manifest.blocks) / 2**20
    if need_mb > profile.model_memory_mb:
        raise PartitionError(
            f"partition needs about {need_mb:.0f} MB, profile {profile.name} allows "
            f"{profile.model_memory_mb} MB for models: run fewer blocks on this device")
    return paths


class BlockRunner:
    """One session per block of a partition, built with the profile's providers."""

    def __init__(self, manifest: PartitionManifest, base_dir: Path, profile: FirmwareProfile,
                 *, verify: bool = True) -> None:
        self.manifest = manifest
        self.profile = profile
        paths = (check_partition(manifest, base_dir, profile) if verify
                 else {b.index: base_dir / b.file for b in manifest.blocks})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = profile.intra_op_threads
        opts.inter_op_num_threads = profile.inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = choose_providers(profile)
        self._sessions: list[tuple[int, ort.InferenceSession, str]] = []
        for block in manifest.blocks:
            try:
                sess = ort.InferenceSession(str(paths[block.index]), opts,
                                            providers=self.providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise PartitionError(f"block {block.index}: onnxruntime cannot load "
                                     f"{paths[block.index]}: {exc}") from None
            self._sessions.append((block.index, sess, sess.get_inputs()[0].name))
        self.active_providers = self._sessions[0][1].get_providers()
        self.input_shape = manifest.blocks[0].input_shape
        self.output_shape = manifest.blocks[-1].output_shape

    @property
    def version(self) -> int:
        return self.manifest.model_version

    def check_input(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"input shape {tuple(x.shape)} != (batch, *{self.input_shape})")
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.number):
                raise InputError(f"input dtype {x.dtype} is not numeric")
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise InputError("input contains NaN or inf")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray, *, checked: bool = False) -> list[np.ndarray]:
        """Activations at every boundary this partition produces (first..last), in order.

        ``checked=True`` skips the input check for inputs a source already validated (the
        agent's pipeline), which matters at sub-millisecond block latencies.
        """
        if not checked:
            x = self.check_input(x)
        outs = []
        for _index, sess, name in self._sessions:
            x = sess.run(None, {name: x})[0]
            outs.append(x)
        return outs

    def warmup(self, repeats: int = 2) -> float:
        """Run dummy inputs so the first real input does not pay for lazy initialisation."""
        t0 = time.perf_counter()
        for _ in range(repeats):
            self.run(np.zeros((1, *self.input_shape), dtype=np.float32))
        return time.perf_counter() - t0
