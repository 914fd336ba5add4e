"""JSON from another party, parsed with bounds checked *before* the parser runs.

``json.loads`` recurses once per nesting level (a ``[[[[...]]]]`` of a few thousand levels
raises ``RecursionError``, which is no ``ValueError`` and killed paho's network thread in the
trainer) and turns every run of digits into a Python ``int`` (thousands of digits raise
``ValueError`` from the int-conversion limit, or cost quadratic time below it). A retained
message on a device's own topic is delivered again after every restart, so such a document
must be refused, counted and dropped, never allowed to escape a callback.

``loads`` checks the size, then the nesting depth with one linear scan that skips string
literals, then parses with hooks that refuse over-long integers and ``NaN``/``Infinity``.
Every failure is an ``UnsafeJSONError`` (a ``ValueError``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.errors import KnetAgentError

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_INT_DIGITS = 40  # a 128-bit integer has 39 digits

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class UnsafeJSONError(KnetAgentError, ValueError):
    """A document that is too large, too deep, not JSON, or holds a forbidden value."""


def nesting_depth(data: bytes) -> int:
    """The deepest ``[``/``{`` nesting outside string literals (malformed input included)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_bounds(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Size and depth of ``data`` within bounds; the bytes, for a parser to use next."""
    raw = data if type(data) is bytes else (
        data.encode() if isinstance(data, str) else bytes(data))
    if len(raw) > max_bytes:
        raise UnsafeJSONError(f"JSON document of {len(raw)} bytes exceeds {max_bytes}")
    # The depth is at most the number of opening brackets: when those are few (every small
    # document, e.g. an envelope's meta), the scan that skips string literals is not needed.
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return raw
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise UnsafeJSONError(f"JSON nesting depth {depth} exceeds {max_depth}")
    return raw


def loads(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_BYTES,
          max_depth: int = DEFAULT_MAX_DEPTH, max_int_digits: int = DEFAULT_MAX_INT_DIGITS,
          allow_constants: bool = False) -> Any:
    """``json.loads`` for untrusted input; raises ``UnsafeJSONError`` on anything refused."""
    raw = check_bounds(data, max_bytes=max_bytes, max_depth=max_depth)
    try:
        # What json.loads does with bytes, with a decoder built once per set of limits.
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        return _decoder(max_int_digits, allow_constants).decode(text)
    except UnsafeJSONError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, ...
        raise UnsafeJSONError(f"not valid JSON: {exc}") from None


_DECODERS: dict[tuple[int, bool], json.JSONDecoder] = {}


def _decoder(max_int_digits: int, allow_constants: bool) -> json.JSONDecoder:
    """A decoder whose hooks refuse over-long integers and (unless allowed) NaN/Infinity.

    Built once per pair of limits: constructing one costs more than parsing a small document.
    A decoder keeps no state between ``decode`` calls, so threads may share it.
    """
    key = (max_int_digits, allow_constants)
    decoder = _DECODERS.get(key)
    if decoder is None:
        def parse_int(text: str) -> int:
            if len(text) > max_int_digits and len(text.lstrip("-")) > max_int_digits:
                raise UnsafeJSONError(f"integer of {len(text)} digits exceeds {max_int_digits}")
            return int(text)

        def parse_constant(name: str) -> float:
            if not allow_constants:
                raise UnsafeJSONError(f"{name} is not a JSON number")
            return float(name)

        decoder = json.JSONDecoder(parse_int=parse_int, parse_constant=parse_constant)
        _DECODERS[key] = decoder
    return decoder


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_DEPTH", "UnsafeJSONError", "check_bounds",
           "loads", "nesting_depth"]
