"""onnxruntime sessions for a partition: the only inference engine on a device.

A ``BlockRunner`` is immutable once built: an update builds a new one beside the running
one, self-tests it, and swaps the reference (``agent.infer.pipeline.RunnerSlot``), so an input is
never processed by a half-updated chain.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.compat import zip_strict
from agent.errors import KnetAgentError
from agent.infer.manifest import ManifestError, PartitionManifest
from agent.infer.profiles import CPU, FirmwareProfile

log = logging.getLogger(__name__)


class InputError(KnetAgentError, ValueError):
    """An input of the wrong shape or dtype, or not finite; it is skipped and counted."""


class PartitionError(KnetAgentError, ValueError):
    """A partition that cannot run on this device; the text says what to change."""


def choose_providers(profile: FirmwareProfile) -> list[str]:
    """The profile's providers in order of preference, minus those this build lacks.

    A Jetson profile asks for TensorRT/CUDA; a CPU-only build (or a broken CUDA install)
    must still run, so missing GPU providers are a warning, and CPU is always last.
    """
    available = set(ort.get_available_providers())
    chosen = [p for p in profile.execution_providers if p in available]
    missing = [p for p in profile.execution_providers if p not in available]
    if missing:
        log.warning("execution providers %s are not in this onnxruntime build (%s); "
                    "falling back to %s", missing, ort.__version__, chosen or [CPU])
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def check_fit(manifest: PartitionManifest, profile: FirmwareProfile) -> list[str]:
    """PartitionError when the profile cannot load the partition; warnings otherwise."""
    if not profile.supports_ir(manifest.ir_version):
        raise PartitionError(
            f"partition {manifest.model_id} v{manifest.model_version} is ONNX IR "
            f"{manifest.ir_version}, but profile {profile.name} (onnxruntime "
            f"{profile.onnxruntime}) reads IR <= {profile.max_ir_version}: re-export it for "
            f"this profile (knet export --profile {profile.name})")
    if not profile.supports_opset(manifest.opset):
        raise PartitionError(
            f"partition {manifest.model_id} v{manifest.model_version} uses opset "
            f"{manifest.opset}, profile {profile.name} reads opset <= {profile.max_opset}: "
            f"re-export it for this profile")
    need_mb = _session_mb(manifest)
    if need_mb > profile.model_memory_mb:
        raise PartitionError(
            f"partition needs about {need_mb:.0f} MB (2x its {len(manifest.blocks)} block "
            f"files), profile {profile.name} allows {profile.model_memory_mb} MB for models: "
            f"run fewer blocks on this device")
    available = set(ort.get_available_providers())
    missing = [p for p in profile.execution_providers if p not in available]
    return ([f"execution providers {missing} are not available in onnxruntime "
             f"{ort.__version__}; the CPU provider runs instead"] if missing else [])


def _session_mb(manifest: PartitionManifest) -> float:
    """Memory of the partition's sessions: the weights plus roughly as much again in arenas
    and optimised copies."""
    return 2 * sum(b.size for b in manifest.blocks) / 2**20


def check_partition(manifest: PartitionManifest, base_dir: Path,
                    profile: FirmwareProfile) -> dict[int, Path]:
    """Refuse, with the reason, a partition that is missing, altered or does not fit."""
    try:
        paths = manifest.verify_files(Path(base_dir))
    except ManifestError as exc:
        raise PartitionError(str(exc)) from None
    check_fit(manifest, profile)
    return paths


def session_options(profile: FirmwareProfile) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = profile.intra_op_threads
    opts.inter_op_num_threads = profile.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # blocks are small chains
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def _shape_matches(declared: list[Any], expected: tuple[int, ...]) -> bool:
    """The file's input/output shape (batch dim first, possibly symbolic) vs the manifest."""
    if len(declared) != len(expected) + 1:
        return False
    return all(not isinstance(d, int) or d == e for d, e in zip_strict(declared[1:],
                                                                         expected))


class _Block:
    __slots__ = ("index", "input_name", "input_shape", "output", "output_shape", "session")

    def __init__(self, index: int, session: ort.InferenceSession, input_name: str,
                 input_shape: tuple[int, ...], output: Any,
                 output_shape: tuple[int, ...]) -> None:
        self.index, self.session, self.input_name = index, session, input_name
        self.input_shape, self.output_shape = input_shape, output_shape
        self.output = output  # onnxruntime's NodeArg: .name, .type


class BlockRunner:
    """One session per block of a partition, built with the profile's providers.

    Immutable after ``__init__`` (attribute assignment raises), so a reference to it can be
    swapped atomically and an in-flight inference keeps the chain it started with.
    """

    __slots__ = (
        "_block_ids",
        "_blocks",
        "_bound",
        "_frozen",
        "_paths",
        "input_shape",
        "manifest",
        "output_shape",
        "profile",
        "providers",
        "requested_providers",
    )

    def __init__(self, manifest: PartitionManifest, base_dir: Path | str,
                 profile: FirmwareProfile, *, verify: bool = True) -> None:
        base_dir = Path(base_dir)
        self.manifest = manifest
        self.profile = profile
        paths = (check_partition(manifest, base_dir, profile) if verify
                 else {b.index: base_dir / b.file for b in manifest.blocks})
        opts = session_options(profile)
        self.requested_providers = tuple(choose_providers(profile))
        blocks = []
        for entry in manifest.blocks:
            path = paths[entry.index]
            try:
                sess = ort.InferenceSession(str(path), opts,
                                            providers=list(self.requested_providers))
            except Exception as exc:  # onnxruntime raises its own exception types
                raise PartitionError(f"block {entry.index}: onnxruntime {ort.__version__} "
                                     f"cannot load {path}: {exc}") from None
            inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
            if not (_shape_matches(inp.shape, entry.input_shape)
                    and _shape_matches(out.shape, entry.output_shape)):
                raise PartitionError(
                    f"block {entry.index}: {path} maps {inp.shape} -> {out.shape}, the "
                    f"manifest says (batch, *{entry.input_shape}) -> "
                    f"(batch, *{entry.output_shape}): the file and manifest do not belong "
                    f"together")
            blocks.append(_Block(entry.index, sess, inp.name, entry.input_shape, out,
                                 entry.output_shape))
        self._blocks = tuple(blocks)
        self._block_ids = tuple(b.index for b in blocks)  # read per frame by the metrics
        self.providers = tuple(self._blocks[0].session.get_providers())
        if self.providers[0] != self.requested_providers[0]:
            log.warning("onnxruntime could not initialise %s; running on %s",
                        self.requested_providers[0], self.providers[0])
        self._paths = paths
        self.input_shape = manifest.blocks[0].input_shape
        self.output_shape = manifest.blocks[-1].output_shape
        self._bound: tuple[bool, BoundChain | None] | None = None  # see bound()
        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"BlockRunner is immutable (set {name!r}): build a new one")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"BlockRunner({m.model_id} v{m.model_version}, blocks {m.first}..{m.last}, "
                f"{self.providers[0]})")

    @property
    def active_providers(self) -> list[str]:
        """The providers in use (a list, for JSON); same as ``providers``."""
        return list(self.providers)

    @property
    def version(self) -> int:
        return self.manifest.model_version

    @property
    def blocks(self) -> tuple[int, ...]:
        return self._block_ids

    def check_input(self, x: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A float32, C-contiguous, finite batch of ``shape`` (default: the input shape)."""
        shape = self.input_shape if shape is None else shape
        if not isinstance(x, np.ndarray):
            raise InputError(f"input is a {type(x).__name__}, not a numpy array")
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise InputError(f"input shape {tuple(x.shape)} != (batch, *{shape})")
        if x.shape[0] == 0:
            raise InputError("empty batch")
        if x.dtype != np.float32:
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
                raise InputError(f"input dtype {x.dtype} is not a real number type")
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise InputError("input contains NaN or inf")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray, upto: int | None = None, *, checked: bool = False,
            timings: list[float] | None = None) -> list[np.ndarray]:
        """Activations at every boundary produced, blocks ``first..upto`` (default: last).

        ``checked=True`` skips the input check for inputs a source already validated (the
        agent's pipeline), which matters at sub-millisecond block latencies. ``timings``,
        when given, receives each block's seconds (per-block latency metrics).
        """
        last = self.manifest.last if upto is None else upto
        if not self.manifest.first <= last <= self.manifest.last:
            raise ValueError(f"upto={upto} outside blocks {self.manifest.first}.."
                             f"{self.manifest.last}")
        if not checked:
            x = self.check_input(x)
        outs = []
        for block in self._blocks[: last - self.manifest.first + 1]:
            t0 = time.perf_counter()
            x = block.session.run(None, {block.input_name: x})[0]
            if timings is not None:
                timings.append(time.perf_counter() - t0)
            outs.append(x)
        return outs

    def bound(self, fuse: bool = True) -> BoundChain | None:
        """The inference thread's fast path: a :class:`BoundChain` for batch-1 inputs, built
        once per runner (call it before a swap so the first input after it does not wait).

        ``fuse``: run the partition as one onnxruntime session whose outputs are every
        boundary (``agent.infer.fuse``); a partition that cannot be fused runs block by block.
        None when a block's output is not float32 (then use :meth:`run`).
        """
        cached = self._bound
        if cached is not None and cached[0] == fuse:
            return cached[1]
        chain: BoundChain | None = None
        if all(b.output.type == "tensor(float)" for b in self._blocks):
            fused = self._fused_session() if fuse and len(self._blocks) > 1 else None
            chain = BoundChain(self._blocks, fused)
            if chain.fused and not self._agrees(chain):
                log.warning("the fused session of %s disagrees with its blocks; running it "
                            "block by block", self.manifest.model_id)
                chain = BoundChain(self._blocks)
        object.__setattr__(self, "_bound", (fuse, chain))  # a cache, not state: see __init__
        return chain

    def _agrees(self, chain: BoundChain) -> bool:
        """The chain computes what the blocks do, on a fixed pseudo-random input."""
        x = np.random.default_rng(0).standard_normal((1, *self.input_shape)).astype(np.float32)
        want = self.run(x, checked=True)
        got = chain.run(x)
        return all(np.allclose(g, w, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(w).max())))
                   for g, w in zip_strict(got, want))

    def _fused_session(self) -> ort.InferenceSession | None:
        from agent.infer.fuse import fuse_blocks, onnx_available

        need_mb = 2 * _session_mb(self.manifest)  # the fused session holds them again
        if need_mb > self.profile.model_memory_mb:
            log.info("running %s block by block: fused it would need about %.0f MB, profile "
                     "%s allows %d MB for models", self.manifest.model_id, need_mb,
                     self.profile.name, self.profile.model_memory_mb)
            return None

        if not onnx_available():
            return None
        paths = [self._paths[b.index] for b in self._blocks]
        try:
            model = fuse_blocks(paths)
            return ort.InferenceSession(model, session_options(self.profile),
                                        providers=list(self.requested_providers))
        except Exception as exc:  # FuseError, or onnxruntime's own exception types
            log.warning("running %s block by block: its blocks could not be fused (%s)",
                        self.manifest.model_id, exc)
            return None

    def run_block(self, index: int, x: np.ndarray) -> np.ndarray:
        """Block ``index`` alone on its input boundary (self-tests, split inference)."""
        if index not in self.blocks:
            raise ValueError(f"block {index} is not in this partition "
                             f"({self.manifest.first}..{self.manifest.last})")
        block = self._blocks[index - self.manifest.first]
        x = self.check_input(x, block.input_shape)
        out: np.ndarray = block.session.run(None, {block.input_name: x})[0]
        return out

    def warmup(self, repeats: int = 1) -> float:
        """Run dummy inputs so the first real input does not pay for lazy initialisation."""
        t0 = time.perf_counter()
        for _ in range(repeats):
            self.run(np.zeros((1, *self.input_shape), dtype=np.float32), checked=True)
        return time.perf_counter() - t0


class BoundChain:
    """A runner's blocks chained through onnxruntime IOBinding, for inputs of batch 1.

    Every boundary is written into a buffer allocated once; block by block, each block reads
    the previous block's buffer in place, and a fused session (one session for the whole
    partition, ``agent.infer.fuse``) writes all of them in one run. Why: ``InferenceSession.run``
    builds a feed dict, allocates every output and wraps it for numpy on each call, and each
    run has a fixed cost; for five sub-millisecond blocks that is a third of a frame. The
    arrays :meth:`run` returns *are* those buffers, overwritten by the next call: a caller
    that keeps an activation copies it. Not thread-safe: one per inference thread.
    """

    __slots__ = ("_first", "_outputs", "_steps", "fused")

    def __init__(self, blocks: tuple[_Block, ...],
                 fused: ort.InferenceSession | None = None) -> None:
        outputs = [np.empty((1, *b.output_shape), np.float32) for b in blocks]
        values = [ort.OrtValue.ortvalue_from_numpy(out) for out in outputs]  # no copies
        steps: list[tuple[ort.InferenceSession, Any]] = []
        if fused is not None:
            io = fused.io_binding()
            for out, value in zip_strict(fused.get_outputs(), values):
                io.bind_ortvalue_output(out.name, value)
            steps.append((fused, io))
            self._first = (io, fused.get_inputs()[0].name)
        else:
            for k, block in enumerate(blocks):
                io = block.session.io_binding()
                if k:
                    io.bind_ortvalue_input(block.input_name, values[k - 1])
                io.bind_ortvalue_output(block.output.name, values[k])
                steps.append((block.session, io))
            self._first = (steps[0][1], blocks[0].input_name)
        self.fused = fused is not None
        self._steps = tuple(steps)
        self._outputs = outputs  # kept alive with the OrtValues that wrap them

    def run(self, x: np.ndarray, timings: list[float] | None = None) -> list[np.ndarray]:
        """Activations at every boundary for ``x`` of shape (1, *input_shape), valid until
        the next call. ``timings`` gets each block's seconds (one entry when fused)."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, np.float32)
        io, name = self._first
        io.bind_cpu_input(name, x)
        for session, binding in self._steps:
            t0 = time.perf_counter()
            session.run_with_iobinding(binding)
            if timings is not None:
                timings.append(time.perf_counter() - t0)
        return self._outputs
