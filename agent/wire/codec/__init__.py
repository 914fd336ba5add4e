"""Activation codecs: a registry of array codecs and a self-describing, CRC-checked frame.

``encode(array, "uint8:per_channel=1+lz4") -> bytes`` and ``decode(frame) -> float32 array``
are the whole interface for the device and the trainer. See ``registry`` for the spec
grammar, ``frame`` for the byte layout, and each codec module for its error bound and its
NaN/inf behaviour. Registered: raw, fp16, uint8, int8, zfp (4 modes), defer.
"""

from . import basic, quant, zfp  # noqa: F401  (importing registers the codecs)
from .errors import (
    CodecError,
    CorruptFrameError,
    InvalidInputError,
    OversizedFrameError,
    SpecError,
    TruncatedFrameError,
    UnknownCodecError,
)
from .registry import (
    DEFAULT_MAX_BYTES,
    Codec,
    CodecSpec,
    SplitBatch,
    batchable,
    check_values,
    codec_names,
    decode,
    encode,
    get_codec,
    parse_spec,
    split_batch,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Codec",
    "CodecError",
    "CodecSpec",
    "CorruptFrameError",
    "InvalidInputError",
    "OversizedFrameError",
    "SpecError",
    "SplitBatch",
    "TruncatedFrameError",
    "UnknownCodecError",
    "batchable",
    "check_values",
    "codec_names",
    "decode",
    "encode",
    "get_codec",
    "parse_spec",
    "split_batch",
]
