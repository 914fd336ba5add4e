"""The self-describing binary frame around a codec payload.

Layout (little-endian), format version 1::

    magic 'KNCF' | version u8 | codec_id u8 | flags u8 | dtype u8 | ndim u8 | params_len u8
    payload_len u32 | shape: ndim x u32 | params: params_len bytes | payload
    crc32 u32 (zlib.crc32 of everything before it)

``flags`` bit 0: the payload is LZ4-framed. ``dtype`` is the decoded dtype, always
float32 (code 1) in version 1; the field exists so a later version can carry others.
Fixed overhead is 18 + 4*ndim + params bytes: small, because per-sample tensors are small.

``parse_frame`` checks, in this order and before anything is allocated or decompressed:
length, magic, version, header fields, the element count against ``max_bytes``, the exact
total length, then the CRC. Codec-level validation happens in the codecs.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from ..checksum import crc32
from .errors import (
    CorruptFrameError,
    OversizedFrameError,
    TruncatedFrameError,
    UnknownCodecError,
)

MAGIC = b"KNCF"
VERSION = 1
FLAG_LZ4 = 1
DTYPE_FLOAT32 = 1
MAX_NDIM = 8
_HEAD = struct.Struct("<4sBBBBBBI")
_CRC = struct.Struct("<I")
MIN_FRAME = _HEAD.size + _CRC.size
_SHAPES = [struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1)]  # one per ndim, compiled once


@dataclass(frozen=True)
class RawFrame:
    """A frame whose envelope is valid; ``payload`` is a zero-copy view into the input."""

    codec_id: int
    flags: int
    shape: tuple[int, ...]
    params: bytes
    payload: memoryview


def frame_head(codec_id: int, flags: int, shape: tuple[int, ...], params: bytes,
               payload_len: int) -> bytes:
    """Everything of a frame before its payload (header, shape, params), checked."""
    if len(shape) > MAX_NDIM:
        raise CorruptFrameError(f"ndim {len(shape)} exceeds {MAX_NDIM}")
    if any(d >= 2**32 for d in shape):
        raise CorruptFrameError(f"dimension of {shape} exceeds 2**32-1")
    if payload_len >= 2**32:
        raise CorruptFrameError("payload exceeds 4 GiB")
    head = _HEAD.pack(
        MAGIC, VERSION, codec_id, flags, DTYPE_FLOAT32, len(shape), len(params), payload_len
    )
    return head + _SHAPES[len(shape)].pack(*shape) + params


def pack_frame(
    codec_id: int, flags: int, shape: tuple[int, ...], params: bytes,
    payload: bytes | memoryview,
) -> bytes:
    body = b"".join([frame_head(codec_id, flags, shape, params, len(payload)), payload])
    return body + _CRC.pack(crc32(body))


def pack_frames(head: bytes, parts: list[memoryview]) -> list[bytes]:
    """Frames sharing everything before their payload tails: ``head`` is ``frame_head(...)``
    plus any payload prefix common to all, ``parts[i]`` the rest of frame i's payload. The
    common part is checksummed once (CRC-32 continues over each tail), for batch splits."""
    crc_head = crc32(head)
    crc, join = _CRC.pack, b"".join
    return [join((head, part, crc(crc32(part, crc_head)))) for part in parts]


def _check_header(magic: bytes, version: int, flags: int, dtype: int, ndim: int) -> None:
    """The fixed header's fields, each against what this build reads."""
    if magic != MAGIC:
        raise CorruptFrameError("not a codec frame (bad magic)")
    if version != VERSION:
        raise UnknownCodecError(f"frame format version {version} is not supported ({VERSION})")
    if flags & ~FLAG_LZ4:
        raise CorruptFrameError(f"unknown flag bits {flags:#04x}")
    if dtype != DTYPE_FLOAT32:
        raise CorruptFrameError(f"unknown dtype code {dtype}")
    if ndim > MAX_NDIM:
        raise CorruptFrameError(f"ndim {ndim} exceeds {MAX_NDIM}")


def peek_shape(frame: bytes | bytearray | memoryview) -> tuple[int, ...] | None:
    """The shape a frame's header declares, without the CRC or length checks (for a frame
    already validated, e.g. by ingest); None when the header itself is not one."""
    view = memoryview(frame).cast("B")
    if len(view) < MIN_FRAME or bytes(view[:4]) != MAGIC:
        return None
    ndim = view[8]
    if ndim > MAX_NDIM or len(view) < _HEAD.size + 4 * ndim:
        return None
    return tuple(struct.unpack_from(f"<{ndim}I", view, _HEAD.size))


def parse_frame(frame: bytes | bytearray | memoryview, max_bytes: int) -> RawFrame:
    """Validate the envelope of ``frame``; raise a ``CodecError`` subclass on any defect."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise CorruptFrameError(f"a frame must be bytes, not {type(frame).__name__}")
    view = memoryview(frame).cast("B")
    if len(view) < MIN_FRAME:
        if bytes(view[:4]) != MAGIC[: len(view[:4])]:
            raise CorruptFrameError("not a codec frame (bad magic)")
        raise TruncatedFrameError(f"frame is {len(view)} bytes, a header needs {MIN_FRAME}")
    magic, version, codec_id, flags, dtype, ndim, params_len, payload_len = _HEAD.unpack_from(
        view
    )
    _check_header(magic, version, flags, dtype, ndim)
    shape_end = _HEAD.size + 4 * ndim
    if len(view) < shape_end:
        raise TruncatedFrameError("frame ends inside its shape")
    shape = _SHAPES[ndim].unpack_from(view, _HEAD.size)
    n_bytes = 4 * math.prod(shape)
    if n_bytes > max_bytes:
        raise OversizedFrameError(
            f"frame declares shape {shape} = {n_bytes} decoded bytes, limit {max_bytes}"
        )
    total = shape_end + params_len + payload_len + _CRC.size
    if len(view) < total:
        raise TruncatedFrameError(f"frame is {len(view)} bytes, its header declares {total}")
    if len(view) > total:
        raise CorruptFrameError(f"{len(view) - total} trailing bytes after the frame")
    (crc,) = _CRC.unpack_from(view, total - _CRC.size)
    if crc32(view[: total - _CRC.size]) != crc:
        raise CorruptFrameError("CRC32 mismatch")
    params_end = shape_end + params_len
    return RawFrame(
        codec_id=codec_id,
        flags=flags,
        shape=shape,
        params=bytes(view[shape_end:params_end]),
        payload=view[params_end : params_end + payload_len],
    )
