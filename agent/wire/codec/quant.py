"""8-bit quantisation: ``uint8`` (affine, min/max) and ``int8`` (symmetric, zero point 0).

Convention: ``per_channel=1`` quantises each index of axis 1 separately, i.e. the C of an
(N, C, ...) batch (or the feature axis of (N, F)); arrays with ndim < 2 fall back to one
scale for the whole tensor. Per-channel costs 8 bytes (uint8) / 4 bytes (int8) per channel.

``uint8``: x ≈ lo + q*scale, scale = (hi-lo)/255. ``lo`` decodes exactly, so the zeros of a
post-ReLU activation stay exact zeros. Max error: scale/2 plus a few float32 ulps.
``int8``: x ≈ q*scale, scale = max|x|/127, q in [-127, 127]; zero is exact, range symmetric.

NaN/inf: refused with ``InvalidInputError`` (there is no finite scale for them). The min/max
the quantiser needs anyway reveals them, so the check is free. A constant array gets
scale 0 and decodes exactly. Arithmetic runs in float32 unless the range is so large or so
tiny that float32 would overflow, where it falls back to float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .errors import CorruptFrameError, InvalidInputError, SpecError
from .registry import Codec, CodecSpec, ParamValue, parse_spec, register

_F32_TINY = float(np.finfo(np.float32).tiny)


def _axes(shape: tuple[int, ...], per_channel: bool) -> tuple[tuple[int, ...] | None, int]:
    """Reduction axes and number of scales: (None, 1) per tensor, else all but axis 1."""
    if per_channel and len(shape) >= 2:
        return tuple(i for i in range(len(shape)) if i != 1), shape[1]
    return None, 1


def _bshape(shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    return (1, k) + (1,) * (len(shape) - 2) if k > 1 or len(shape) >= 2 else ()


def _eps(mag: np.ndarray) -> np.ndarray:
    """Float32 rounding slack of the affine arithmetic: a few ulps of the magnitude."""
    return 8.0 * 2.0**-23 * mag + _F32_TINY


class _QuantCodec(Codec):
    lossless = False
    signed: bool

    def canonical_params(
        self, params: Mapping[str, str | ParamValue]
    ) -> tuple[tuple[str, ParamValue], ...]:
        unknown = set(params) - {"per_channel"}
        if unknown:
            raise SpecError(f"{self.name}: unknown parameters {sorted(unknown)}")
        value = params.get("per_channel", 0)
        if str(value) not in ("0", "1"):
            raise SpecError(f"{self.name}: per_channel must be 0 or 1, got {value!r}")
        return (("per_channel", 1),) if str(value) == "1" else ()

    def pack_params(self, spec: CodecSpec) -> bytes:
        return bytes([int(spec.param("per_channel", 0) or 0)])

    def unpack_params(self, data: bytes) -> tuple[tuple[str, ParamValue], ...]:
        if data not in (b"\x00", b"\x01"):
            raise CorruptFrameError(f"{self.name}: bad parameter bytes {data!r}")
        return (("per_channel", 1),) if data == b"\x01" else ()

    def _k(self, shape: tuple[int, ...], spec: CodecSpec) -> int:
        return _axes(shape, bool(spec.param("per_channel", 0)))[1]

    def _minmax(self, a: np.ndarray, spec: CodecSpec) -> tuple[np.ndarray, np.ndarray, int]:
        axes, k = _axes(a.shape, bool(spec.param("per_channel", 0)))
        lo = np.asarray(a.min(axis=axes), dtype=np.float64).reshape(k)
        hi = np.asarray(a.max(axis=axes), dtype=np.float64).reshape(k)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise InvalidInputError(f"{self.name}: NaN or inf in the input")
        return lo, hi, k

    def _header(self, payload: bytes | memoryview, shape: tuple[int, ...],
                spec: CodecSpec) -> tuple[object, ...]:
        """The payload's length and scales checked; what decoding needs of them."""
        raise NotImplementedError

    def values_finite(self, payload: bytes | memoryview, shape: tuple[int, ...],
                      spec: CodecSpec) -> bool:
        """Finite, non-negative scales (and offsets) give finite values: the decode clips
        to float32."""
        self._header(payload, shape, spec)
        return True

    def max_payload_len(self, shape: tuple[int, ...], spec: CodecSpec) -> int:
        k = self._k(shape, spec)
        return math.prod(shape) + (4 if self.signed else 8) * k

    def sample_layout(self, shape: tuple[int, ...], spec: CodecSpec) -> tuple[int, int]:
        """The scales (one per channel of axis 1, or one) then one byte per element: a
        sample of an (N, C, ...) batch has the same C channels, so the scales carry over."""
        return (4 if self.signed else 8) * self._k(shape, spec), 1


class Uint8Codec(_QuantCodec):
    name = "uint8"
    codec_id = 3
    signed = False

    def encode_payload(self, a: np.ndarray, spec: CodecSpec) -> bytes:
        a = a.reshape(-1) if a.ndim == 0 else a  # ufunc out= needs an array, not a scalar
        lo, hi, k = self._minmax(a, spec)
        scale = ((hi - lo) / 255.0).astype(np.float32)
        lo32 = lo.astype(np.float32)
        span = hi - lo
        fast = bool(np.all((span == 0) | ((span > 1e-30) & (span < 1e37))))
        dt = np.float32 if fast else np.float64
        with np.errstate(divide="ignore"):
            inv = np.where(scale > 0, 1.0 / scale.astype(np.float64), 0.0).astype(dt)
        b = _bshape(a.shape, k)
        t = np.subtract(a, lo32.astype(dt).reshape(b), dtype=dt)
        t *= inv.reshape(b)
        np.rint(t, out=t)
        np.clip(t, 0, 255, out=t)
        return b"".join([lo32.astype("<f4").tobytes(), scale.astype("<f4").tobytes(),
                         t.astype(np.uint8).tobytes()])

    def _header(self, payload: bytes | memoryview, shape: tuple[int, ...],
                spec: CodecSpec) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(lo, scale, k, n) of a payload whose length and scales are checked."""
        k = self._k(shape, spec)
        n = math.prod(shape)
        if len(payload) != 8 * k + n:
            raise CorruptFrameError(f"uint8 payload is {len(payload)} bytes, expected {8 * k + n}")
        lo = np.frombuffer(payload, dtype="<f4", count=k).astype(np.float32)
        scale = np.frombuffer(payload, dtype="<f4", count=k, offset=4 * k).astype(np.float32)
        if not (np.isfinite(lo).all() and np.isfinite(scale).all() and (scale >= 0).all()):
            raise CorruptFrameError("uint8: non-finite or negative scale/offset")
        return lo, scale, k, n

    def decode_payload(
        self, payload: bytes | memoryview, shape: tuple[int, ...], spec: CodecSpec
    ) -> np.ndarray:
        lo, scale, k, n = self._header(payload, shape, spec)
        q = np.frombuffer(payload, dtype=np.uint8, count=n, offset=8 * k).reshape(shape)
        top = np.abs(lo.astype(np.float64)) + 255.0 * scale.astype(np.float64)
        dt = np.float32 if float(top.max()) < 1e38 else np.float64
        b = _bshape(shape, k)
        out: np.ndarray = q.astype(dt)
        out *= scale.astype(dt).reshape(b)
        out += lo.astype(dt).reshape(b)
        if dt is np.float64:
            with np.errstate(over="ignore"):
                out = np.clip(out, -3.4028235e38, 3.4028235e38).astype(np.float32)
        return out

    def error_bound(self, array: np.ndarray, spec: CodecSpec | str) -> float:
        """max over scales of (hi-lo)/255/2, plus float32 rounding slack."""
        spec = parse_spec(spec)
        a = np.asarray(array, dtype=np.float32)
        if a.size == 0:
            return 0.0
        lo, hi, _ = self._minmax(a, spec)
        bound = (hi - lo) / 510.0 + _eps(np.maximum(np.abs(lo), np.abs(hi)))
        return float(bound.max())


class Int8Codec(_QuantCodec):
    name = "int8"
    codec_id = 4
    signed = True

    def encode_payload(self, a: np.ndarray, spec: CodecSpec) -> bytes:
        a = a.reshape(-1) if a.ndim == 0 else a  # ufunc out= needs an array, not a scalar
        lo, hi, k = self._minmax(a, spec)
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = (amax / 127.0).astype(np.float32)
        fast = bool(np.all((amax == 0) | ((amax > 1e-30) & (amax < 1e37))))
        dt = np.float32 if fast else np.float64
        with np.errstate(divide="ignore"):
            inv = np.where(scale > 0, 1.0 / scale.astype(np.float64), 0.0).astype(dt)
        t = np.multiply(a, inv.reshape(_bshape(a.shape, k)), dtype=dt)
        np.rint(t, out=t)
        np.clip(t, -127, 127, out=t)
        out: bytes = scale.astype("<f4").tobytes() + t.astype(np.int8).tobytes()
        return out

    def _header(self, payload: bytes | memoryview, shape: tuple[int, ...],
                spec: CodecSpec) -> tuple[np.ndarray, int, int]:
        """(scale, k, n) of a payload whose length and scales are checked."""
        k = self._k(shape, spec)
        n = math.prod(shape)
        if len(payload) != 4 * k + n:
            raise CorruptFrameError(f"int8 payload is {len(payload)} bytes, expected {4 * k + n}")
        scale = np.frombuffer(payload, dtype="<f4", count=k).astype(np.float32)
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise CorruptFrameError("int8: non-finite or negative scale")
        return scale, k, n

    def decode_payload(
        self, payload: bytes | memoryview, shape: tuple[int, ...], spec: CodecSpec
    ) -> np.ndarray:
        scale, k, n = self._header(payload, shape, spec)
        q = np.frombuffer(payload, dtype=np.int8, count=n, offset=4 * k).reshape(shape)
        dt = np.float32 if float(scale.max()) * 127.0 < 1e38 else np.float64
        out: np.ndarray = q.astype(dt)
        out *= scale.astype(dt).reshape(_bshape(shape, k))
        if dt is np.float64:
            out = np.clip(out, -3.4028235e38, 3.4028235e38).astype(np.float32)
        return out

    def error_bound(self, array: np.ndarray, spec: CodecSpec | str) -> float:
        """max over scales of max|x|/127/2, plus float32 rounding slack."""
        spec = parse_spec(spec)
        a = np.asarray(array, dtype=np.float32)
        if a.size == 0:
            return 0.0
        lo, hi, _ = self._minmax(a, spec)
        amax = np.maximum(np.abs(lo), np.abs(hi))
        return float((amax / 254.0 + _eps(amax)).max())


register(Uint8Codec())
register(Int8Codec())
