"""The codec's exception hierarchy: one base class callers catch, subclasses that say why.

Every failure of ``encode``/``decode``/``parse_spec`` surfaces as a ``CodecError``; numpy,
zfpy and lz4 errors never escape (they are chained as ``__cause__``). ``CodecError`` is a
``ValueError`` so code that already guards bad input with ``except ValueError`` keeps working.
"""

from __future__ import annotations

from agent.errors import KnetAgentError


class CodecError(KnetAgentError, ValueError):
    """Base class of every codec failure."""


class TruncatedFrameError(CodecError):
    """The frame ends before its header or declared payload does."""


class CorruptFrameError(CodecError):
    """The frame is not a valid codec frame: bad magic, CRC, lengths, params or payload."""


class OversizedFrameError(CodecError):
    """The frame declares more decoded data than the caller's limit; refused before allocating."""


class UnknownCodecError(CodecError):
    """An unknown codec name/id or an unsupported frame format version."""


class SpecError(CodecError):
    """A codec spec string or parameter that does not parse or is out of range."""


class InvalidInputError(CodecError):
    """``encode`` was given an array the codec cannot represent (e.g. NaN for a quantiser)."""
