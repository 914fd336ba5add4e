"""The wire's CRC-32: zlib's values whichever library computes them, so a device on plain
zlib and a trainer on zlib-ng read each other's messages."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from zlib_ng import zlib_ng

from agent.wire import checksum

REPO = Path(__file__).resolve().parents[1]


def test_the_trainer_computes_it_with_zlib_ng() -> None:
    """The trainer's extras install zlib-ng: ingest's two CRCs per message use it."""
    assert checksum.crc32 is zlib_ng.crc32


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=70_000), st.integers(0, 2**32 - 1), st.integers(0, 64))
def test_values_are_zlibs_including_continuations(data: bytes, start: int, cut: int) -> None:
    view = memoryview(data)[min(cut, len(data)):]
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(view) == zlib.crc32(view)
    assert checksum.crc32(data, start) == zlib.crc32(data, start)
    head, tail = data[:cut], data[cut:]  # frame.pack_frames continues a head's CRC per tail
    assert checksum.crc32(tail, zlib.crc32(head)) == zlib.crc32(data)


def test_a_device_without_zlib_ng_uses_zlib() -> None:
    """The agent's install does not require zlib-ng: without it the wire uses zlib's."""
    code = ("import sys, zlib; sys.modules['zlib_ng'] = None; "
            "from agent.wire import checksum; assert checksum.crc32 is zlib.crc32; "
            "from agent.wire.codec import decode, encode; import numpy as np; "
            "a = np.ones((2, 3), np.float32); assert (decode(encode(a, 'raw')) == a).all()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
