"""The activation envelope: the one binary message a device sends to the trainer.

Layout (little-endian), version 1::

    magic 'KNAE' | version u8 | flags u8 | boundary u8 | reserved u8
    session u64 | seq u64 | timestamp f64 | model_version u32
    label i32 | prediction i32 | confidence f32
    device_len u8 | device utf-8 | meta_len u16 | meta JSON | payload_len u32 | payload
    crc32 u32 (of everything before it)

The payload is a codec frame (``agent.wire.codec``), self-describing and CRC-checked on its own.
``(device, session, seq)`` identifies a message for deduplication: ``session`` is new on
every agent start, ``seq`` counts up within it.

Version 2 is a *batch*: N samples of one device, session, boundary and model version in one
message, so the per-message costs (codec call, quantisation range, LZ4, envelope, spool row,
MQTT publish and PUBACK) are paid once per N samples::

    magic 'KNAE' | version u8 = 2 | flags u8 = 0 | boundary u8 | reserved u8
    session u64 | model_version u32 | count u32
    device_len u8 | device utf-8 | meta_len u16 | meta JSON (shared by every sample)
    count x sample record (37 bytes, ``SAMPLE_DTYPE``):
        seq u64 | timestamp f64 | index i64 | label i32 | prediction i32 | confidence f32
        | flags u8 (label, prediction, confidence, index present)
    payload_len u32 | payload: ONE codec frame of shape (count, ...)
    crc32 u32 (of everything before it)

Each sample keeps its own ``seq`` (strictly increasing within a batch), so the trainer
deduplicates per sample with the same ``(device, session, seq)`` key as version 1, and a
replayed batch stores nothing twice. A version-1 reader (``Envelope.unpack``, what older
trainers run) refuses a batch with ``EnvelopeVersionError`` ("envelope version 2; this build
reads 1"), counted as ``version``; ``unpack_any`` reads both. The batch's codec must split
per sample (``agent.wire.codec.batchable``: raw, fp16, uint8, int8).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from agent import safejson
from agent.errors import KnetAgentError
from agent.wire.checksum import crc32

MAGIC = b"KNAE"
VERSION = 1
_FIXED = struct.Struct("<4sBBBBQQdIiif")
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
# Which optional fields a message or a batch's sample record carries (its ``flags``).
FLAG_LABEL, FLAG_PRED, FLAG_CONF, FLAG_INDEX = 1, 2, 4, 8
_FLAG_LABEL, _FLAG_PRED, _FLAG_CONF = FLAG_LABEL, FLAG_PRED, FLAG_CONF
MAX_META_BYTES = 4096
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
BATCH_VERSION = 2
MAX_BATCH = 4096  # samples in one batch envelope: bounds the table a header may declare
_BATCH_FIXED = struct.Struct("<4sBBBBQII")
_FLAG_INDEX = FLAG_INDEX
SAMPLE_DTYPE = np.dtype([("seq", "<u8"), ("timestamp", "<f8"), ("index", "<i8"),
                         ("label", "<i4"), ("prediction", "<i4"), ("confidence", "<f4"),
                         ("flags", "u1")])  # packed: 37 bytes a sample


class EnvelopeError(KnetAgentError, ValueError):
    """A message that is not a valid activation envelope; the text says why."""


class EnvelopeVersionError(EnvelopeError):
    """A well-formed envelope of a wire version this build does not speak."""


@dataclass(frozen=True)
class Envelope:
    device: str
    session: int
    seq: int
    timestamp: float
    model_version: int
    boundary: int
    payload: bytes
    label: int | None = None
    prediction: int | None = None
    confidence: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.device, self.session, self.seq)

    def pack(self) -> bytes:
        device, meta = _packed_ids(self.device, self.meta, self.boundary)
        flags = (
            (_FLAG_LABEL if self.label is not None else 0)
            | (_FLAG_PRED if self.prediction is not None else 0)
            | (_FLAG_CONF if self.confidence is not None else 0)
        )
        head = _FIXED.pack(
            MAGIC, VERSION, flags, self.boundary, 0,
            self.session, self.seq, self.timestamp, self.model_version,
            -1 if self.label is None else self.label,
            -1 if self.prediction is None else self.prediction,
            math.nan if self.confidence is None else self.confidence,
        )
        return _sealed([head, _U8.pack(len(device)), device, _U16.pack(len(meta)), meta,
                        _U32.pack(len(self.payload)), self.payload])

    @classmethod
    def unpack(cls, data: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Envelope:
        """Parse and validate; raises EnvelopeError (never an internal error) on bad input."""
        view = memoryview(data)
        if len(view) < _FIXED.size + 4:
            raise EnvelopeError(f"truncated: {len(view)} bytes is shorter than the header")
        (magic, version, flags, boundary, _r, session, seq, ts, model_version, label,
         prediction, confidence) = _FIXED.unpack_from(view, 0)
        if magic != MAGIC:
            raise EnvelopeError(f"bad magic {bytes(magic)!r}: not a knet activation envelope")
        if version != VERSION:
            raise EnvelopeVersionError(f"envelope version {version}; this build reads {VERSION}")
        device, meta_raw, pos, end = _checked_ids(view, _FIXED.size)
        payload = _payload(view, pos, end, max_payload)
        device_id, meta = _decoded_ids(device, meta_raw)
        if not math.isfinite(ts):
            raise EnvelopeError("timestamp is not finite")
        return cls(
            device=device_id, session=session, seq=seq, timestamp=ts,
            model_version=model_version, boundary=boundary, payload=bytes(payload),
            label=label if flags & _FLAG_LABEL else None,
            prediction=prediction if flags & _FLAG_PRED else None,
            confidence=confidence if flags & _FLAG_CONF else None,
            meta=meta,
        )


def _packed_ids(device: str, meta: dict[str, Any], boundary: int) -> tuple[bytes, bytes]:
    """The device id and meta as they go on the wire, within the format's limits."""
    raw = device.encode()
    if not 0 < len(raw) < 256:
        raise EnvelopeError("device id must be 1-255 bytes")
    packed = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    if len(packed) > MAX_META_BYTES:
        raise EnvelopeError(f"meta is {len(packed)} bytes, limit {MAX_META_BYTES}")
    if not 0 <= boundary < 256:
        raise EnvelopeError(f"boundary {boundary} out of range 0-255")
    return raw, packed


def _sealed(parts: list[bytes]) -> bytes:
    """The message: its parts and the CRC-32 of them."""
    body = b"".join(parts)
    return body + _U32.pack(crc32(body))


def _checked_ids(view: memoryview, pos: int
                 ) -> tuple[memoryview, memoryview, int, int]:
    """After the CRC check, the device id and meta fields that follow the fixed header at
    ``pos``; also where they end and where the CRC starts."""
    end = len(view) - 4
    (crc,) = _U32.unpack_from(view, end)
    if crc32(view[:end]) != crc:
        raise EnvelopeError("CRC mismatch: the message was corrupted")
    device, pos = _take(view, pos, end, _U8, "device")
    meta_raw, pos = _take(view, pos, end, _U16, "meta")
    return device, meta_raw, pos, end


def _decoded_ids(device: memoryview, meta_raw: memoryview) -> tuple[str, dict[str, Any]]:
    """The device id and meta of a message; bounded depth and integers in the meta, so
    that a device's JSON cannot crash the trainer."""
    try:
        device_id = bytes(device).decode()
        meta = safejson.loads(bytes(meta_raw), allow_constants=True) if meta_raw else {}
    except (UnicodeDecodeError, safejson.UnsafeJSONError) as exc:
        raise EnvelopeError(f"undecodable device id or meta: {exc}") from None
    if not isinstance(meta, dict):
        raise EnvelopeError("meta must be a JSON object")
    return device_id, meta

def _take(view: memoryview, pos: int, end: int, length: struct.Struct,
          what: str) -> tuple[memoryview, int]:
    """The ``length``-prefixed field at ``pos``; ``end`` is where the CRC starts."""
    start = pos + length.size
    if start > end:
        raise EnvelopeError(f"truncated in the {what}")
    (n,) = length.unpack_from(view, pos)
    stop = start + n
    if stop > end:
        raise EnvelopeError(f"truncated in the {what}: {n} bytes declared")
    return view[start:stop], stop


def _payload(view: memoryview, pos: int, end: int, max_payload: int) -> memoryview:
    """The payload, the last field: bounded by ``max_payload`` before anything is copied."""
    if pos + _U32.size > end:
        raise EnvelopeError("truncated in the payload length")
    (n,) = _U32.unpack_from(view, pos)
    if n > max_payload:
        raise EnvelopeError(f"payload of {n} bytes exceeds the {max_payload} limit")
    payload, stop = _take(view, pos, end, _U32, "payload")
    if stop != end:
        raise EnvelopeError(f"{end - stop} stray bytes after the payload")
    return payload


@dataclass(frozen=True)
class BatchEnvelope:
    """Version 2: ``samples`` (a ``SAMPLE_DTYPE`` array, one record a sample, seq strictly
    increasing) and one codec frame of shape (len(samples), ...) in ``payload``."""

    device: str
    session: int
    model_version: int
    boundary: int
    samples: np.ndarray
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def table(seqs: list[int], timestamps: list[float], indices: list[int | None],
              labels: list[int | None], predictions: list[int | None],
              confidences: list[float | None]) -> np.ndarray:
        """The per-sample records from columns (None: absent)."""
        t = np.zeros(len(seqs), SAMPLE_DTYPE)
        t["seq"], t["timestamp"] = seqs, timestamps
        for col, values, flag, absent in (("index", indices, _FLAG_INDEX, -1),
                                          ("label", labels, _FLAG_LABEL, -1),
                                          ("prediction", predictions, _FLAG_PRED, -1),
                                          ("confidence", confidences, _FLAG_CONF, math.nan)):
            present = [v is not None for v in values]
            t[col] = [absent if v is None else v for v in values]
            t["flags"] |= np.where(present, flag, 0).astype(np.uint8)
        return t

    def pack(self) -> bytes:
        device, meta = _packed_ids(self.device, self.meta, self.boundary)
        samples = np.ascontiguousarray(self.samples, SAMPLE_DTYPE)
        if not 0 < len(samples) <= MAX_BATCH:
            raise EnvelopeError(f"a batch holds 1-{MAX_BATCH} samples, not {len(samples)}")
        head = _BATCH_FIXED.pack(MAGIC, BATCH_VERSION, 0, self.boundary, 0, self.session,
                                 self.model_version, len(samples))
        return _sealed([head, _U8.pack(len(device)), device, _U16.pack(len(meta)), meta,
                        samples.tobytes(), _U32.pack(len(self.payload)), self.payload])

    @classmethod
    def unpack(cls, data: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> BatchEnvelope:
        """Parse and validate a version-2 message; raises EnvelopeError on bad input, and
        allocates nothing that the message's own length does not bound."""
        view = memoryview(data)
        if len(view) < _BATCH_FIXED.size + 4:
            raise EnvelopeError(f"truncated: {len(view)} bytes is shorter than the header")
        (magic, version, flags, boundary, _r, session, model_version,
         count) = _BATCH_FIXED.unpack_from(view, 0)
        if magic != MAGIC:
            raise EnvelopeError(f"bad magic {bytes(magic)!r}: not a knet activation envelope")
        if version != BATCH_VERSION:
            raise EnvelopeVersionError(f"envelope version {version} is not a batch "
                                       f"(version {BATCH_VERSION})")
        if flags:
            raise EnvelopeError(f"unknown batch flags {flags:#04x}")
        if not 0 < count <= MAX_BATCH:
            raise EnvelopeError(f"batch declares {count} samples, limit 1-{MAX_BATCH}")
        device, meta_raw, pos, end = _checked_ids(view, _BATCH_FIXED.size)
        table_end = pos + count * SAMPLE_DTYPE.itemsize
        if table_end > end:
            raise EnvelopeError(f"truncated in the sample table: {count} samples declared")
        samples = np.frombuffer(view[pos:table_end], SAMPLE_DTYPE).copy()
        payload = _payload(view, table_end, end, max_payload)
        _check_samples(samples)
        device_id, meta = _decoded_ids(device, meta_raw)
        return cls(device=device_id, session=session, model_version=model_version,
                   boundary=boundary, samples=samples, payload=bytes(payload), meta=meta)

    def envelopes(self, frames: list[bytes]) -> list[Envelope]:
        """One version-1 ``Envelope`` per sample, with its own frame (``frames[i]``, e.g.
        from ``agent.wire.codec.split_batch``): the samples a store's reader sees, as if sent one
        by one (the store itself keeps the batch's frame once)."""
        if len(frames) != len(self.samples):
            raise EnvelopeError(f"{len(frames)} frames for {len(self.samples)} samples")
        out = []
        base = self.meta
        for (seq, ts, index, label, pred, conf, flags), frame in zip(self.samples.tolist(),
                                                                    frames):
            out.append(Envelope(
                device=self.device, session=self.session, seq=seq, timestamp=ts,
                model_version=self.model_version, boundary=self.boundary, payload=frame,
                label=label if flags & _FLAG_LABEL else None,
                prediction=pred if flags & _FLAG_PRED else None,
                confidence=conf if flags & _FLAG_CONF else None,
                meta={**base, "index": index} if flags & _FLAG_INDEX else dict(base)))
        return out


AnyEnvelope = Union[Envelope, BatchEnvelope]


def unpack_any(data: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> AnyEnvelope:
    """Either wire version: a version-1 ``Envelope`` or a version-2 ``BatchEnvelope``."""
    if len(data) > 4 and data[4] == BATCH_VERSION and bytes(data[:4]) == MAGIC:
        return BatchEnvelope.unpack(data, max_payload)
    try:
        return Envelope.unpack(data, max_payload)
    except EnvelopeVersionError as exc:
        raise EnvelopeVersionError(f"{exc} and {BATCH_VERSION}") from None


def _check_samples(samples: np.ndarray) -> None:
    """Per-sample fields a trainer relies on: finite times, one seq per sample."""
    if not np.isfinite(samples["timestamp"]).all():
        raise EnvelopeError("a sample's timestamp is not finite")
    if len(samples) > 1 and not (samples["seq"][1:] > samples["seq"][:-1]).all():
        raise EnvelopeError("sample seqs are not strictly increasing")
    if samples["flags"].max() > 15:
        raise EnvelopeError("unknown sample flag bits")
