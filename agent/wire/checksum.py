"""CRC-32 for the wire: zlib's polynomial and values, computed by zlib-ng where installed.

The envelope and the codec frame each end in a CRC-32 of their bytes, and ingest checks both
on every message. CPython's zlib computes it at ~4 GB/s here, 45 µs for a 184 kB batch of 32
effnet-lite0 samples; zlib-ng's carry-less-multiply CRC is ~10× faster with the same values
(docs/benchmarks.md, issue 16). The trainer installs zlib-ng; a device without it uses zlib,
and either side reads the other's messages.
"""

from __future__ import annotations

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # a device install without zlib-ng (tests/test_checksum.py)
    from zlib import crc32

__all__ = ["crc32"]
