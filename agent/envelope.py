"""The activation envelope: the one binary message a device sends to the trainer.

Layout (little-endian), version 1::

    magic 'KNAE' | version u8 | flags u8 | boundary u8 | reserved u8
    session u64 | seq u64 | timestamp f64 | model_version u32
    label i32 | prediction i32 | confidence f32
    device_len u8 | device utf-8 | meta_len u16 | meta JSON | payload_len u32 | payload
    crc32 u32 (of everything before it)

The payload is a codec frame (``agent.codec``), self-describing and CRC-checked on its own.
``(device, session, seq)`` identifies a message for deduplication: ``session`` is new on
every agent start, ``seq`` counts up within it.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from agent import safejson
from agent.errors import KnetAgentError

MAGIC = b"KNAE"
VERSION = 1
_FIXED = struct.Struct("<4sBBBBQQdIiif")
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
_FLAG_LABEL, _FLAG_PRED, _FLAG_CONF = 1, 2, 4
MAX_META_BYTES = 4096
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024


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
        device = self.device.encode()
        if not 0 < len(device) < 256:
            raise EnvelopeError("device id must be 1-255 bytes")
        meta = json.dumps(self.meta, separators=(",", ":")).encode() if self.meta else b""
        if len(meta) > MAX_META_BYTES:
            raise EnvelopeError(f"meta is {len(meta)} bytes, limit {MAX_META_BYTES}")
        if not 0 <= self.boundary < 256:
            raise EnvelopeError(f"boundary {self.boundary} out of range 0-255")
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
        body = b"".join([
            head, struct.pack("<B", len(device)), device,
            struct.pack("<H", len(meta)), meta,
            struct.pack("<I", len(self.payload)), self.payload,
        ])
        return body + struct.pack("<I", zlib.crc32(body))

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
        (crc,) = _U32.unpack_from(view, len(view) - 4)
        if zlib.crc32(view[:-4]) != crc:
            raise EnvelopeError("CRC mismatch: the message was corrupted")
        end = len(view) - 4
        pos = _FIXED.size
        device, pos = _take(view, pos, end, _U8, "device")
        meta_raw, pos = _take(view, pos, end, _U16, "meta")
        if pos + 4 > end:
            raise EnvelopeError("truncated in the payload length")
        (payload_len,) = _U32.unpack_from(view, pos)
        if payload_len > max_payload:
            raise EnvelopeError(f"payload of {payload_len} bytes exceeds the {max_payload} limit")
        payload, pos = _take(view, pos, end, _U32, "payload")
        if pos != end:
            raise EnvelopeError(f"{end - pos} stray bytes after the payload")
        try:
            device_id = bytes(device).decode()
            # Bounded depth and integers: a device's meta must not crash the trainer.
            meta = safejson.loads(bytes(meta_raw), allow_constants=True) if meta_raw else {}
        except (UnicodeDecodeError, safejson.UnsafeJSONError) as exc:
            raise EnvelopeError(f"undecodable device id or meta: {exc}") from None
        if not isinstance(meta, dict):
            raise EnvelopeError("meta must be a JSON object")
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
