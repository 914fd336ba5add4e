"""Codec specs, the registry, and the two entry points ``encode`` and ``decode``.

A spec string is ``name[:k=v[,k=v]][+lz4]``. ``str(spec)`` is canonical: parameters sorted,
defaults dropped, numbers in their shortest round-tripping form, so equal settings compare
(and hash, and log) equal.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from . import lz4util
from .errors import (
    CodecError,
    CorruptFrameError,
    InvalidInputError,
    SpecError,
    UnknownCodecError,
)
from .frame import (
    FLAG_LZ4,
    MAX_NDIM,
    RawFrame,
    frame_head,
    pack_frame,
    pack_frames,
    parse_frame,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 2**20
ParamValue = Union[int, float]


def format_value(v: ParamValue) -> str:
    """Shortest text that parses back to ``v`` (``8.0`` -> ``8``, ``1e-3`` -> ``0.001``)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


@dataclass(frozen=True)
class CodecSpec:
    """A codec name, its non-default parameters (sorted) and whether LZ4 framing follows."""

    name: str
    params: tuple[tuple[str, ParamValue], ...] = ()
    lz4: bool = False

    def param(self, key: str, default: ParamValue | None = None) -> ParamValue | None:
        return dict(self.params).get(key, default)

    def __str__(self) -> str:
        text = self.name
        if self.params:
            text += ":" + ",".join(f"{k}={format_value(v)}" for k, v in self.params)
        return text + ("+lz4" if self.lz4 else "")


class Codec(ABC):
    """One registered codec. Subclasses define the payload; the frame is handled here."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    #: True when every setting of this codec is lossless (zfp is lossless only without params).
    lossless: ClassVar[bool]
    #: False for codecs whose payload already is LZ4 (``defer``).
    allows_lz4: ClassVar[bool] = True

    def canonical_params(
        self, params: Mapping[str, str | ParamValue]
    ) -> tuple[tuple[str, ParamValue], ...]:
        """Validate and normalise parameters; the default accepts none."""
        if params:
            raise SpecError(f"codec {self.name!r} takes no parameters, got {sorted(params)}")
        return ()

    def is_lossless(self, spec: CodecSpec) -> bool:
        return self.lossless

    def pack_params(self, spec: CodecSpec) -> bytes:
        return b""

    def unpack_params(self, data: bytes) -> tuple[tuple[str, ParamValue], ...]:
        if data:
            raise CorruptFrameError(f"codec {self.name!r} takes no parameters")
        return ()

    @abstractmethod
    def encode_payload(self, a: np.ndarray, spec: CodecSpec) -> bytes | memoryview:
        """Encode a C-contiguous, non-empty float32 array."""

    @abstractmethod
    def decode_payload(
        self, payload: bytes | memoryview, shape: tuple[int, ...], spec: CodecSpec
    ) -> np.ndarray:
        """Decode to a writable float32 array of ``shape``; validate lengths exactly."""

    @abstractmethod
    def max_payload_len(self, shape: tuple[int, ...], spec: CodecSpec) -> int:
        """Upper bound on the (pre-LZ4) payload for ``shape``: bounds LZ4 and parsing."""

    @abstractmethod
    def error_bound(self, array: np.ndarray, spec: CodecSpec | str) -> float | None:
        """Declared max-abs-error of a round trip of ``array``; None = no a-priori bound."""

    def values_finite(self, payload: bytes | memoryview, shape: tuple[int, ...],
                      spec: CodecSpec) -> bool:
        """Check ``payload`` as ``decode_payload`` would, without building the array, and
        return True when those checks prove every value it decodes to finite. False (the
        default): only a decode tells. Spares a full validation a float32 copy of every
        sample where the header decides (8-bit quantisation)."""
        return False

    def sample_layout(self, shape: tuple[int, ...], spec: CodecSpec) -> tuple[int, int] | None:
        """(shared header bytes, bytes per element) when the (pre-LZ4) payload of ``shape``
        is a header shared by every sample followed by the elements in C order, so that a
        batch frame splits into per-sample frames without re-encoding; None: it does not."""
        return None

    def __repr__(self) -> str:
        return f"<codec {self.name} id={self.codec_id}>"


_BY_NAME: dict[str, Codec] = {}
_BY_ID: dict[int, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.name in _BY_NAME or codec.codec_id in _BY_ID:
        raise ValueError(f"codec {codec.name!r}/{codec.codec_id} registered twice")
    _BY_NAME[codec.name] = codec
    _BY_ID[codec.codec_id] = codec
    return codec


def codec_names() -> list[str]:
    """The registered base names, sorted."""
    return sorted(_BY_NAME)


def get_codec(name: str) -> Codec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownCodecError(f"unknown codec {name!r}; known: {codec_names()}") from None


def parse_spec(spec: str | CodecSpec) -> CodecSpec:
    """Parse ``name[:k=v[,k=v]][+lz4]`` (or re-validate a ``CodecSpec``) into canonical form."""
    if isinstance(spec, CodecSpec):
        codec = get_codec(spec.name)
        params: dict[str, str | ParamValue] = dict(spec.params)
        lz4 = spec.lz4
    elif isinstance(spec, str):
        text = spec.strip()
        lz4 = text.endswith("+lz4")
        if lz4:
            text = text[: -len("+lz4")]
        name, sep, rest = text.partition(":")
        codec = get_codec(name.strip())
        params = {}
        if sep:
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq or not key or key in params:
                    raise SpecError(f"bad parameter {item!r} in spec {spec!r}")
                params[key] = value.strip()
    else:
        raise SpecError(f"a codec spec is a str or CodecSpec, not {type(spec).__name__}")
    if lz4 and not codec.allows_lz4:
        raise SpecError(f"codec {codec.name!r} already includes LZ4")
    return CodecSpec(codec.name, codec.canonical_params(params), lz4)


def _as_float32(array: np.ndarray) -> np.ndarray:
    """C-contiguous float32 view or copy: float16/64, ints and bools are converted."""
    a = np.asarray(array)
    if a.dtype.kind not in "fiub":
        raise InvalidInputError(f"cannot encode dtype {a.dtype}")
    if a.ndim > MAX_NDIM:
        raise InvalidInputError(f"ndim {a.ndim} exceeds {MAX_NDIM}")
    if a.dtype != np.float32:
        with np.errstate(over="ignore"):  # float64 beyond float32 range becomes inf
            a = a.astype(np.float32)
    return a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray makes 0-d 1-d


def encode(array: np.ndarray, spec: str | CodecSpec) -> bytes:
    """Encode ``array`` (any ndim, converted to float32) into a self-describing frame."""
    spec = parse_spec(spec)
    codec = _BY_NAME[spec.name]
    a = _as_float32(array)
    if any(d >= 2**32 for d in a.shape):
        raise InvalidInputError(f"dimension of {a.shape} exceeds 2**32-1")
    payload: bytes | memoryview = b""
    flags = 0
    if a.size:
        try:
            payload = codec.encode_payload(a, spec)
            if spec.lz4:
                packed = lz4util.compress(payload)
                if lz4_pays(len(payload), len(packed)):
                    payload, flags = packed, FLAG_LZ4
        except CodecError:
            raise
        except Exception as exc:  # a library failure must not leak its own type
            raise InvalidInputError(f"{spec}: cannot encode {a.shape}: {exc}") from exc
    return pack_frame(codec.codec_id, flags, a.shape, codec.pack_params(spec), payload)


def lz4_pays(plain: int, packed: int) -> bool:
    """``+lz4`` keeps LZ4 on a frame only where it saves at least 1/32 of the bytes.

    After 8-bit quantisation LZ4 gains 1.0× on effnet-lite0's activations
    (docs/benchmarks.md, issue 16), yet every reader would pay a decompression pass for
    nothing: such a frame goes without the LZ4 flag, which every reader honours."""
    return packed <= plain - (plain >> 5)


def _parsed(frame: bytes | memoryview, max_bytes: int) -> tuple[RawFrame, Codec, CodecSpec]:
    """A frame's header checked (CRC, size bound, known codec, LZ4 allowed), not decoded."""
    raw = parse_frame(frame, max_bytes)
    codec = _BY_ID.get(raw.codec_id)
    if codec is None:
        raise UnknownCodecError(f"unknown codec id {raw.codec_id}")
    lz4 = bool(raw.flags & FLAG_LZ4)
    if lz4 and not codec.allows_lz4:
        raise CorruptFrameError(f"codec {codec.name!r} frame has the LZ4 flag")
    return raw, codec, CodecSpec(codec.name, codec.unpack_params(raw.params), lz4)


@contextlib.contextmanager
def _untrusted(spec: CodecSpec, what: str) -> Iterator[None]:
    """Untrusted bytes: numpy, zfpy and lz4 raise types of their own; callers see only
    ``CodecError`` subclasses."""
    try:
        yield
    except CodecError:
        raise
    except Exception as exc:
        raise CorruptFrameError(f"{spec}: {what}: {exc}") from exc


def _plain_payload(raw: RawFrame, codec: Codec, spec: CodecSpec) -> bytes | memoryview:
    """The payload before LZ4, bounded by what the shape allows."""
    bound = codec.max_payload_len(raw.shape, spec)
    if spec.lz4:
        return lz4util.decompress_bounded(raw.payload, bound)
    if len(raw.payload) > bound:
        raise CorruptFrameError(f"payload {len(raw.payload)} bytes exceeds its bound {bound}")
    return raw.payload


def _decoded(raw: RawFrame, codec: Codec, spec: CodecSpec,
             payload: bytes | memoryview) -> np.ndarray:
    out = codec.decode_payload(payload, raw.shape, spec)
    if out.shape != raw.shape or out.dtype != np.float32:  # a codec bug, not bad input
        raise CorruptFrameError(f"{spec}: decoded {out.dtype}{out.shape}, expected {raw.shape}")
    return out


def _finite_samples(raw: RawFrame, codec: Codec, spec: CodecSpec,
                    payload: bytes | memoryview) -> np.ndarray:
    """Per sample (axis 0; one entry for a 0-d frame): are all its values finite? Decodes
    only when the codec's own checks do not decide."""
    n = raw.shape[0] if raw.shape else 1
    if codec.values_finite(payload, raw.shape, spec):
        return np.ones(n, dtype=bool)
    values = _decoded(raw, codec, spec, payload).reshape(n, -1)
    return np.asarray(np.isfinite(values).all(axis=1), dtype=bool)


def _empty(raw: RawFrame) -> bool:
    """Whether the frame holds an empty array (which must come without a payload)."""
    if math.prod(raw.shape):
        return False
    if len(raw.payload):
        raise CorruptFrameError("payload present for an empty array")
    return True


def decode(frame: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode a frame to a writable float32 array of its original shape.

    Raises only ``CodecError`` subclasses. ``max_bytes`` bounds the decoded array and is
    checked from the header before anything is allocated or decompressed; intermediate
    buffers are bounded by a small multiple of it (see each codec's ``max_payload_len``).
    """
    raw, codec, spec = _parsed(frame, max_bytes)
    if _empty(raw):
        return np.empty(raw.shape, dtype=np.float32)
    with _untrusted(spec, "payload does not decode"):
        return _decoded(raw, codec, spec, _plain_payload(raw, codec, spec))


def check_values(frame: bytes | memoryview, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[tuple[int, ...], bool]:
    """Everything ``decode`` checks, and whether every value is finite: (shape, finite),
    without a float32 copy where the codec's header decides (ingest's full validation).
    Raises only ``CodecError`` subclasses."""
    raw, codec, spec = _parsed(frame, max_bytes)
    if _empty(raw):
        return tuple(raw.shape), True
    with _untrusted(spec, "payload does not decode"):
        finite = _finite_samples(raw, codec, spec, _plain_payload(raw, codec, spec))
    return tuple(raw.shape), bool(finite.all())


def batchable(spec: str | CodecSpec) -> bool:
    """Whether frames of this spec split per sample (``split_batch``): the agent batches
    samples into one frame only with such a codec."""
    spec = parse_spec(spec)
    return _BY_NAME[spec.name].sample_layout((2, 1), spec) is not None


class SplitBatch:
    """A batch frame checked as a whole, cut per sample on demand: ``frames[i]`` holds
    sample ``i`` alone (shape ``(1, *shape[1:])``, the batch's codec and parameters, its
    quantisation range, without LZ4). ``finite[i]``: whether sample ``i``'s values are all
    finite, when the values were checked.

    The frames are made only when read (ingest validates a batch and stores its frame
    once; the store cuts it when a reader asks for its samples)."""

    def __init__(self, shape: tuple[int, ...], finite: np.ndarray | None, common: bytes,
                 payload: memoryview, head: int, step: int) -> None:
        self.shape = shape
        self.finite = finite
        self._common, self._payload, self._head, self._step = common, payload, head, step

    @functools.cached_property
    def frames(self) -> list[bytes]:
        view, head, step = self._payload, self._head, self._step
        return pack_frames(self._common, [view[head + i * step: head + (i + 1) * step]
                                          for i in range(self.shape[0])])


def split_batch(frame: bytes | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES,
                values: bool = True) -> SplitBatch:
    """Check a frame of shape (N, ...) once (header, CRC, one LZ4 pass and, with
    ``values``, every value as ``check_values`` does, per sample) so that it cuts into N
    per-sample frames; raises only ``CodecError`` subclasses.

    The per-sample frames are not LZ4-compressed again: over one sample of a few kB, LZ4
    after 8-bit quantisation gains 1.0× on effnet-lite0's boundaries and ~1.2× on post-ReLU
    maps (docs/benchmarks.md), and compressing each sample again would cost about as
    much CPU as the rest of the split."""
    raw, codec, spec = _parsed(frame, max_bytes)
    if not raw.shape or math.prod(raw.shape) == 0:
        raise CorruptFrameError(f"a batch frame needs a non-empty (N, ...) shape, not {raw.shape}")
    layout = codec.sample_layout(raw.shape, spec)
    if layout is None:
        raise UnknownCodecError(f"codec {codec.name!r} frames do not split per sample")
    with _untrusted(spec, "batch payload does not split"):
        payload = _plain_payload(raw, codec, spec)
        head, per_elem = layout
        n = raw.shape[0]
        step = per_elem * (math.prod(raw.shape) // n)
        if len(payload) != head + n * step:
            raise CorruptFrameError(f"{spec}: payload is {len(payload)} bytes, expected "
                                    f"{head + n * step}")
        finite = _finite_samples(raw, codec, spec, payload) if values else None
        view = memoryview(payload)
        common = frame_head(codec.codec_id, raw.flags & ~FLAG_LZ4, (1, *raw.shape[1:]),
                            codec.pack_params(spec), head + step) + bytes(view[:head])
    return SplitBatch(tuple(raw.shape), finite, common, view, head, step)


def max_abs(a: np.ndarray) -> float:
    """max(|a|) over finite values without allocating |a| (0.0 for empty)."""
    if a.size == 0:
        return 0.0
    hi, lo = float(a.max()), float(a.min())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            return 0.0
        hi, lo = float(finite.max()), float(finite.min())
    return max(abs(hi), abs(lo))
