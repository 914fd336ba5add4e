"""``raw`` (float32 bytes as they are) and ``fp16`` (IEEE half precision).

NaN/inf: ``raw`` is bit-exact for every pattern. ``fp16`` maps NaN to NaN and ±inf to ±inf,
but refuses finite values beyond ±65504 with ``InvalidInputError``: silently turning a large
activation into inf would break the trainer's loss far from the cause.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CorruptFrameError, InvalidInputError
from .registry import Codec, CodecSpec, max_abs, register

FP16_MAX = 65504.0


def _exact_len(payload: bytes | memoryview, expected: int, name: str) -> None:
    if len(payload) != expected:
        raise CorruptFrameError(f"{name} payload is {len(payload)} bytes, expected {expected}")


class RawCodec(Codec):
    name = "raw"
    codec_id = 1
    lossless = True

    def encode_payload(self, a: np.ndarray, spec: CodecSpec) -> memoryview:
        return a.astype("<f4", copy=False).reshape(-1).data.cast("B")

    def decode_payload(
        self, payload: bytes | memoryview, shape: tuple[int, ...], spec: CodecSpec
    ) -> np.ndarray:
        n = math.prod(shape)
        _exact_len(payload, 4 * n, self.name)
        return np.frombuffer(payload, dtype="<f4", count=n).astype(np.float32).reshape(shape)

    def max_payload_len(self, shape: tuple[int, ...], spec: CodecSpec) -> int:
        return 4 * math.prod(shape)

    def sample_layout(self, shape: tuple[int, ...], spec: CodecSpec) -> tuple[int, int]:
        return 0, 4

    def error_bound(self, array: np.ndarray, spec: CodecSpec | str) -> float:
        return 0.0


class Fp16Codec(Codec):
    name = "fp16"
    codec_id = 2
    lossless = False

    def encode_payload(self, a: np.ndarray, spec: CodecSpec) -> bytes:
        hi, lo = float(a.max()), float(a.min())
        if not (abs(hi) <= FP16_MAX and abs(lo) <= FP16_MAX):  # rare: NaN, inf or too large
            finite = np.isfinite(a)
            if np.any(np.abs(a[finite]) > FP16_MAX):
                raise InvalidInputError(f"fp16: finite values beyond ±{FP16_MAX}")
        return a.astype("<f2").tobytes()

    def decode_payload(
        self, payload: bytes | memoryview, shape: tuple[int, ...], spec: CodecSpec
    ) -> np.ndarray:
        n = math.prod(shape)
        _exact_len(payload, 2 * n, self.name)
        return np.frombuffer(payload, dtype="<f2", count=n).astype(np.float32).reshape(shape)

    def max_payload_len(self, shape: tuple[int, ...], spec: CodecSpec) -> int:
        return 2 * math.prod(shape)

    def sample_layout(self, shape: tuple[int, ...], spec: CodecSpec) -> tuple[int, int]:
        return 0, 2

    def error_bound(self, array: np.ndarray, spec: CodecSpec | str) -> float:
        """Half an ulp relative (2^-11) for normals, plus half the smallest subnormal."""
        return max_abs(np.asarray(array, dtype=np.float32)) * 2.0**-11 + 2.0**-25


register(RawCodec())
register(Fp16Codec())
