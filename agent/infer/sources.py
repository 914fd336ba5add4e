"""Input sources: an ``.npz`` replay, a directory of images, frames arriving over MQTT.

Every source is an iterable of ``Sample``. A bad input (wrong shape or dtype, an
undecodable image, a corrupt archive member) is counted by reason and skipped: a camera
glitch must never stop the agent. A finite source ends; a looping source that yields nothing
in a whole pass ends too, instead of spinning.
"""

from __future__ import annotations

import logging
import struct
import time
import zipfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Union

import numpy as np

from agent.config import ImagesSource, MqttSource, NpzSource, UpstreamSource
from agent.infer.frames import (
    UNTRUSTED_PARSE_ERRORS,
    BadInputs,
    FrameError,
    MqttFrames,
    Sample,
    coerce,
    decode_frame,
    decode_image,
)

# The frame vocabulary lives in agent.infer.frames (which agent.infer.chain builds on too); these
# names stay importable from here.
__all__ = ["UNTRUSTED_PARSE_ERRORS", "BadInputs", "FrameError", "ImageDirectory", "MqttFrames",
           "NpzReplay", "Sample", "Source", "coerce", "decode_frame", "decode_image",
           "make_source"]

log = logging.getLogger(__name__)


def _pace(rate_hz: float, start: float, count: int) -> None:
    if rate_hz > 0:
        delay = start + count / rate_hz - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _limited(samples: Generator[Sample, None, None], max_frames: int | None
             ) -> Iterator[Sample]:
    """The first ``max_frames`` samples (all when None); closing the replay releases its
    file at once."""
    if max_frames is None:
        return samples
    return _take(samples, max_frames)


def _take(samples: Generator[Sample, None, None], n: int) -> Iterator[Sample]:
    try:
        for count, sample in enumerate(samples, 1):
            yield sample
            if count >= n:
                return
    finally:
        samples.close()


def _label(y: np.ndarray | None, i: int) -> int | None:
    if y is None:
        return None
    try:
        value = y[i].item()
        return int(value) if float(value).is_integer() else None
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


_CHUNK_BYTES = 512 * 1024  # rows read per chunk by the npz fast path: at most 8, ~0.5 MiB
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name and extra lengths


def _npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the ``.npy`` stream at ``fh`` (size-limited)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError("an object array (it would need pickle, which is refused)")
    return shape, fortran, dtype


def _stored_data_offset(fh: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the archive file."""
    fh.seek(info.header_offset)
    raw = fh.read(_ZIP_LOCAL_HEADER.size)
    if len(raw) != _ZIP_LOCAL_HEADER.size:
        raise ValueError("truncated zip local header")
    magic, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(raw)
    if magic != b"PK\x03\x04":
        raise ValueError("bad zip local header")
    offset: int = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    return offset


class _NpyRows:
    """The rows (first axis) of one ``.npy`` member of an ``.npz``, read one at a time.

    Why not ``np.load``: it holds the whole member in memory (a 3,000-frame camera replay is
    330 MB, a tenth of a small device's RAM). Opening still checks the member's zip CRC in
    one streaming pass (1 MiB at a time), so a damaged archive yields no frame at all, as
    with ``np.load``. Then a stored member (``np.savez``) is read row by row straight from
    its offset in the file, and a compressed one (``np.savez_compressed``) streams through
    ``zipfile`` again. A short or inconsistent member is refused, and every row is still
    checked by ``coerce``. Fortran-ordered arrays have no contiguous rows: loaded whole.
    """

    def __init__(self, path: Path, key: str, verify: bool = True) -> None:
        """``verify=False`` skips the CRC pass (a looping replay re-opening the same,
        unchanged file it verified before)."""
        self._zip = zipfile.ZipFile(path)
        self._fh: IO[bytes] | None = None
        try:
            names = self._zip.namelist()
            name = f"{key}.npy" if f"{key}.npy" in names else key
            if name not in names:
                raise KeyError(f"{key!r} is not in the archive (members: {names[:10]})")
            info = self._zip.getinfo(name)
            if verify:
                with self._zip.open(info) as member:  # BadZipFile at the end on a bad CRC
                    while member.read(1 << 20):
                        pass
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
                start = _stored_data_offset(self._fh, info)
                self._fh.seek(start)
                self.shape, fortran, self.dtype = _npy_header(self._fh)
                available = info.file_size - (self._fh.tell() - start)
            else:
                self._fh = self._zip.open(info)
                self.shape, fortran, self.dtype = _npy_header(self._fh)
                available = None
            if not self.shape:
                raise ValueError(f"{key!r} is a scalar")
            self._row_shape = tuple(self.shape[1:])
            self._row_shape_size = int(np.prod(self._row_shape, dtype=np.int64))
            self._row_bytes = self._row_shape_size * self.dtype.itemsize
            need = self._row_bytes * self.shape[0]
            if available is not None and need > available:
                raise ValueError(f"member {name!r} holds {available} bytes, its header "
                                 f"promises {need} (truncated)")
            self._whole: np.ndarray | None = None
            if fortran and len(self.shape) > 1:
                self._whole = np.load(path, allow_pickle=False)[key]
        except BaseException:  # the file is closed on any failure, then re-raised
            self.close()
            raise

    def __len__(self) -> int:
        return int(self.shape[0])

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._whole is not None:
            yield from self._whole
            return
        assert self._fh is not None
        if self._row_bytes == 0:
            raise ValueError("rows of zero bytes")
        for i in range(len(self)):
            data = self._fh.read(self._row_bytes)
            if len(data) != self._row_bytes:
                raise ValueError(f"member ends inside row {i} of {len(self)} (truncated)")
            yield np.frombuffer(data, self.dtype).reshape(self._row_shape)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self._row_shape

    @property
    def row_bytes(self) -> int:
        return self._row_bytes

    @property
    def contiguous(self) -> bool:
        """Rows come out C-contiguous (not the Fortran-order fallback)."""
        return self._whole is None

    def chunks(self, max_rows: int) -> Iterator[np.ndarray]:
        """The rows, up to ``max_rows`` at a time as one (n, *row_shape) array: one read and
        one finite check per chunk instead of per row."""
        if self._whole is not None:
            for start in range(0, len(self), max_rows):
                yield self._whole[start:start + max_rows]
            return
        assert self._fh is not None
        if self._row_bytes == 0:
            raise ValueError("rows of zero bytes")
        for start in range(0, len(self), max_rows):
            n = min(max_rows, len(self) - start)
            data = self._fh.read(n * self._row_bytes)
            whole = len(data) // self._row_bytes
            if whole:
                yield np.frombuffer(data, self.dtype, whole * self._row_shape_size
                                    ).reshape(whole, *self._row_shape)
            if whole != n:
                raise ValueError(f"member ends inside row {start + whole} of {len(self)} "
                                 "(truncated)")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._zip.close()


class NpzReplay:
    """Replays ``x`` (and optional labels ``y``) from an ``.npz`` file, streaming ``x``."""

    def __init__(self, cfg: NpzSource, input_shape: tuple[int, ...], bad: BadInputs) -> None:
        self.cfg, self.input_shape, self.bad = cfg, input_shape, bad
        self.name = f"npz:{cfg.path.name}"
        self._prepared: tuple[_NpyRows, np.ndarray | None] | None = None
        self._verified: tuple[int, int, int, int] | None = None  # the file last CRC-checked

    def _labels(self, n: int) -> np.ndarray | None:
        """The labels, or None; a corrupt label member costs the labels, not the inputs."""
        if not self.cfg.y_key:
            return None
        try:
            with np.load(self.cfg.path, allow_pickle=False) as data:
                if self.cfg.y_key not in data.files:
                    return None
                y: np.ndarray = data[self.cfg.y_key]
        except UNTRUSTED_PARSE_ERRORS as exc:
            self.bad.add("npz_labels", f"{self.cfg.y_key!r}: {exc}; labels ignored")
            return None
        if y.ndim != 1 or len(y) != n:
            self.bad.add("npz_labels", f"labels of shape {y.shape} for {n} inputs; "
                         "labels ignored")
            return None
        return y

    def prepare(self) -> None:
        """Open and verify the archive now (the agent calls this before it reports ready),
        so the first pass does not pay for the CRC check; errors are counted as usual."""
        if self._prepared is None:
            self._prepared = self._open()

    def _identity(self) -> tuple[int, int, int, int]:
        st = self.cfg.path.stat()
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _open(self) -> tuple[_NpyRows, np.ndarray | None] | None:
        """Open the archive; its CRC is checked again only when the file changed (a loop
        over 330 MB would otherwise spend a third of a second per pass re-reading it)."""
        try:
            identity = self._identity()
            rows = _NpyRows(self.cfg.path, self.cfg.x_key, verify=identity != self._verified)
            self._verified = identity
        except UNTRUSTED_PARSE_ERRORS as exc:
            self._verified = None
            self.bad.add("npz_unreadable", f"{self.cfg.path}: {exc}")
            return None
        try:
            return rows, self._labels(len(rows))
        except BaseException:  # the file is closed on any failure, then re-raised
            rows.close()
            raise

    def __iter__(self) -> Iterator[Sample]:
        return _limited(self._replay(), self.cfg.max_frames)

    def _replay(self) -> Generator[Sample, None, None]:
        index = 0
        start = time.monotonic()
        while True:
            opened, self._prepared = self._prepared or self._open(), None
            if opened is None:
                return
            rows, y = opened
            first_of_pass = index
            # Fast path: float32 rows of the input shape are checked a chunk at a time (the
            # per-row checks were a sixth of the source thread's time under the GIL).
            fast = (rows.contiguous and rows.dtype == np.float32
                    and rows.row_shape == self.input_shape)
            per_chunk = max(1, min(8, _CHUNK_BYTES // max(1, rows.row_bytes))) if fast else 1
            i = 0
            try:
                for chunk in rows.chunks(per_chunk):
                    finite = (np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1).tolist()
                              if fast else None)
                    for j, row in enumerate(chunk):
                        _pace(self.cfg.rate_hz, start, index)
                        try:
                            if finite is None:
                                xi = coerce(row, self.input_shape)
                            elif finite[j]:
                                xi = row
                            else:
                                raise FrameError("contains NaN or inf")
                        except FrameError as exc:
                            self.bad.add("shape", f"{self.name}[{i}]: {exc}")
                            i += 1
                            continue
                        yield Sample(xi, _label(y, i), self.name, index)
                        index += 1
                        i += 1
            except UNTRUSTED_PARSE_ERRORS as exc:
                self.bad.add("npz_unreadable", f"{self.cfg.path}: {exc}")
                return
            finally:
                rows.close()
            if not self.cfg.loop or index == first_of_pass:
                return


class ImageDirectory:
    """Every image matching ``glob`` in a directory, in name order."""

    def __init__(self, cfg: ImagesSource, input_shape: tuple[int, ...], bad: BadInputs) -> None:
        self.cfg, self.input_shape, self.bad = cfg, input_shape, bad
        self.name = f"images:{cfg.directory.name}"

    def __iter__(self) -> Iterator[Sample]:
        return _limited(self._replay(), self.cfg.max_frames)

    def _replay(self) -> Generator[Sample, None, None]:
        index = 0
        start = time.monotonic()
        while True:
            files = sorted(p for p in self.cfg.directory.glob(self.cfg.glob) if p.is_file())
            yielded = False
            for path in files:
                _pace(self.cfg.rate_hz, start, index)
                try:
                    x = decode_image(path, self.input_shape, resize=self.cfg.resize)
                except FrameError as exc:
                    self.bad.add("image", f"{path.name}: {exc}")
                    continue
                yield Sample(x, None, self.name, index)
                index += 1
                yielded = True
            if not self.cfg.loop or not yielded:
                return


Source = Union[NpzReplay, ImageDirectory, MqttFrames]


def make_source(cfg: NpzSource | ImagesSource | MqttSource | UpstreamSource,
                input_shape: tuple[int, ...], bad: BadInputs | None = None) -> Source:
    """The source a ``[source]`` section describes; bad inputs go to ``bad``."""
    bad = bad if bad is not None else BadInputs()
    if isinstance(cfg, UpstreamSource):  # a later stage of a chain (agent/infer/chain.py)
        from agent.infer.chain import UpstreamFrames

        return UpstreamFrames(cfg, input_shape, bad)
    if isinstance(cfg, NpzSource):
        return NpzReplay(cfg, input_shape, bad)
    if isinstance(cfg, ImagesSource):
        return ImageDirectory(cfg, input_shape, bad)
    return MqttFrames(cfg, input_shape, bad)
