"""One onnxruntime graph for a partition's blocks, with every boundary as an output.

Why: a partition of small blocks spends much of each frame in per-run overhead (the feed,
output allocation, the executor's set-up), once per block. The fused graph computes the
same activations in one run; onnxruntime also optimises across the former block edges.
The per-block sessions stay for everything that runs a single block (self-tests, split
serving, benchmarks); the fused one only serves the inference thread's batch-1 path.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

from agent.errors import KnetAgentError

log = logging.getLogger(__name__)
_said = threading.Event()


class FuseError(KnetAgentError, ValueError):
    """The blocks cannot be merged into one graph (the text says why)."""


def onnx_available() -> bool:
    """Whether fusing is possible. ``onnx`` is optional on a device (a large wheel that
    old numpy/ml_dtypes mixes break); without it partitions run block by block, which the
    log says once per process rather than on every swap."""
    if importlib.util.find_spec("onnx") is not None:
        return True
    if not _said.is_set():
        _said.set()
        log.warning("the onnx package is not installed: partitions run block by block "
                    "(install knet-agent[fuse] or onnx to run each as one session)")
    return False


def fuse_blocks(paths: list[Path]) -> bytes:
    """The serialised model: block ``i``'s names get the prefix ``b{i}_``; its input is the
    previous block's output; the outputs are every block's output, in order."""
    try:
        import onnx
        from onnx import compose
    except ImportError as exc:
        raise FuseError(f"the onnx package is not installed ({exc})") from None
    models = [compose.add_prefix(onnx.load(str(p)), f"b{i}_") for i, p in enumerate(paths)]
    for m in models:
        if len(m.graph.input) != 1 or len(m.graph.output) != 1:
            raise FuseError(f"{m.graph.name}: a block has one input and one output, this one "
                            f"{len(m.graph.input)} and {len(m.graph.output)}")
    fused = models[0]
    for nxt in models[1:]:
        outputs = [o.name for o in fused.graph.output] + [nxt.graph.output[0].name]
        try:
            fused = compose.merge_models(
                fused, nxt, io_map=[(fused.graph.output[-1].name, nxt.graph.input[0].name)],
                outputs=outputs)
        except ValueError as exc:  # different IR versions or opsets, name clashes
            raise FuseError(str(exc)) from None
    out: bytes = fused.SerializeToString()
    return out
