"""The self-test a freshly built ``BlockRunner`` passes before it may replace the running one.

It checks what a signature cannot: the blocks fit this device's slice (same boundaries,
so the device's neighbours in a chain still understand it), they produce outputs of the
declared shapes, every output is finite, and on the device's own recent inputs (its
canaries) they agree with the running version: top-1 agreement when the slice ends at the
logits, mean cosine similarity of the last boundary otherwise. Agreement catches a wrong or
broken block; judging accuracy is the trainer's evaluation gate's job.

Like is compared with like: the running version runs on the same canaries first, and only
the inputs it handled sanely (input and output finite and within
``agent.update.canary.SANE_MAGNITUDE``) are used, for the finiteness check as for the agreement.
An input near float32's limit (any client allowed on the input topic can send 3e38
everywhere) on which the running version is barely finite and a retrained block overflows
says nothing about the update; a non-finite output on an ordinary input is a failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.compat import zip_strict
from agent.infer.runtime import BlockRunner
from agent.update.canary import sane_rows

log = logging.getLogger(__name__)

Failure = Literal["incompatible", "self_test_failed"]


@dataclass(frozen=True)
class SelfTestResult:
    ok: bool
    reason: Failure | None = None
    detail: str = ""
    agreement: float | None = None
    canaries: int = 0


def compatible(new: BlockRunner, old: BlockRunner, *, recut: bool = False) -> str | None:
    """Why ``new`` cannot stand in for ``old`` on this device, or None. ``recut`` (a signed
    slice assignment moved the cut): ``last`` may differ, ``first`` may not (the device's
    inputs feed block ``first``)."""
    a, b = new.manifest, old.manifest
    if a.model_id != b.model_id:
        return f"model {a.model_id!r}, this device runs {b.model_id!r}"
    same = ((a.first, a.num_blocks) == (b.first, b.num_blocks) if recut
            else (a.first, a.last, a.num_blocks) == (b.first, b.last, b.num_blocks))
    if not same:
        return (f"blocks {a.first}..{a.last} of {a.num_blocks}, this device runs "
                f"{b.first}..{b.last} of {b.num_blocks}")
    span = slice(a.first - 1, max(a.last, b.last) + 1)
    if a.boundaries[span] != b.boundaries[span]:
        return f"boundary shapes {a.boundaries[span]} != running {b.boundaries[span]}"
    return None


def _probe_inputs(runner: BlockRunner, canaries: list[np.ndarray]) -> np.ndarray:
    if canaries:
        return np.stack(canaries).astype(np.float32, copy=False)
    rng = np.random.default_rng(0)  # no inputs seen yet: shapes and finiteness only
    return rng.random((4, *runner.input_shape), dtype=np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = den == 0
    cos = np.where(both_zero, 1.0, num / np.where(both_zero, 1.0, den))
    return float(cos.mean())


def agreement(new_out: np.ndarray, old_out: np.ndarray, ends_at_logits: bool) -> float:
    if ends_at_logits:
        return float((new_out.argmax(axis=1) == old_out.argmax(axis=1)).mean())
    return _cosine(new_out, old_out)


def self_test(new: BlockRunner, old: BlockRunner, canaries: list[np.ndarray], *,
              threshold: float, min_canaries: int, recut: bool = False) -> SelfTestResult:
    """With ``recut`` the versions are compared at the last boundary both produce (blocks
    only one of them has are checked for shapes and finiteness alone)."""
    why = compatible(new, old, recut=recut)
    if why is not None:
        return SelfTestResult(False, "incompatible", why)
    x = _probe_inputs(new, canaries)
    common = min(new.manifest.last, old.manifest.last)
    old_last = old.run(x, upto=common)[-1]
    sane = sane_rows(x) & sane_rows(old_last)
    if not sane.all():
        log.warning("self-test: %d of %d canary inputs left out: they or the running "
                    "version's outputs on them are not sane", int((~sane).sum()), len(x))
        x, old_last = x[sane], old_last[sane]
        canaries = [c for c, keep in zip_strict(canaries, sane) if keep]
        if not len(x):  # nothing the running version handles: shapes and finiteness only
            x = _probe_inputs(new, [])
            old_last = old.run(x, upto=common)[-1]
    try:
        outs = new.run(x)
    except Exception as exc:  # onnxruntime raises its own types for a bad graph
        return SelfTestResult(False, "self_test_failed", f"inference failed: {exc}"[:500])
    for block, out in zip_strict(new.manifest.blocks, outs):
        if tuple(out.shape) != (len(x), *block.output_shape):
            return SelfTestResult(False, "incompatible",
                                  f"block {block.index} outputs {tuple(out.shape)}, the "
                                  f"partition says (batch, *{block.output_shape})")
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            return SelfTestResult(False, "self_test_failed",
                                  f"block {block.index} produced {bad} NaN/inf values on "
                                  f"{len(x)} inputs")
    if len(canaries) < min_canaries:
        return SelfTestResult(True, detail=f"agreement not checked: {len(canaries)} canary "
                                           f"inputs < {min_canaries}", canaries=len(canaries))
    score = agreement(outs[common - new.manifest.first], old_last,
                      common == new.manifest.num_blocks)
    if score < threshold:
        return SelfTestResult(False, "self_test_failed",
                              f"agreement {score:.3f} with the running version on "
                              f"{len(x)} canary inputs < {threshold}", score, len(x))
    return SelfTestResult(True, agreement=score, canaries=len(x))
