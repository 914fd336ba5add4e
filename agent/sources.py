"""Input sources: an ``.npz`` replay, a directory of images, frames arriving over MQTT.

A bad input (wrong shape or dtype, an undecodable image, a corrupt archive member) is
counted by reason and skipped: a camera glitch must never stop the agent.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.config import ImagesSource, MqttSource, NpzSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    x: np.ndarray  # float32, the partition's input shape (no batch dimension)
    label: int | None
    index: int
    source: str
    t_read: float  # time.monotonic() when the input was read


class FrameError(ValueError):
    """A frame that cannot be turned into an input of the expected shape."""


class BadInputs:
    """Counts of skipped inputs by reason, shared with metrics."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, reason: str, detail: str = "") -> None:
        with self._lock:
            self.counts[reason] += 1
            n = self.counts[reason]
        if n <= 3 or n % 1000 == 0:  # a flood of bad frames must not flood the log
            log.warning("bad input skipped (%s, %d so far): %s", reason, n, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _pace(rate_hz: float, start: float, count: int) -> None:
    if rate_hz > 0:
        delay = start + count / rate_hz - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def coerce(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """An array of the input shape as float32, or FrameError."""
    if not np.issubdtype(x.dtype, np.number):
        raise FrameError(f"dtype {x.dtype} is not numeric")
    if tuple(x.shape) != input_shape:
        if x.size == int(np.prod(input_shape)) and x.ndim in (1, len(input_shape) + 1):
            x = x.reshape(input_shape)  # flattened, or with a batch axis of 1
        else:
            raise FrameError(f"shape {tuple(x.shape)} != expected {input_shape}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise FrameError("contains NaN or inf")
    return x


class NpzReplay:
    """Replays ``x`` (and optional labels ``y``) from an ``.npz`` file."""

    def __init__(self, cfg: NpzSource, input_shape: tuple[int, ...], bad: BadInputs) -> None:
        self.cfg, self.input_shape, self.bad = cfg, input_shape, bad
        self.name = f"npz:{cfg.path.name}"

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        try:
            with np.load(self.cfg.path, allow_pickle=False) as data:
                x = data[self.cfg.x_key]
                y = data[self.cfg.y_key] if self.cfg.y_key and self.cfg.y_key in data else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            self.bad.add("npz_unreadable", f"{self.cfg.path}: {exc}")
            return None
        if y is not None and len(y) != len(x):
            self.bad.add("npz_labels", f"{len(y)} labels for {len(x)} inputs; labels ignored")
            y = None
        return x, y

    def __iter__(self) -> Iterator[Sample]:
        index = 0
        start = time.monotonic()
        while True:
            arrays = self._arrays()
            if arrays is None:
                return
            x, y = arrays
            for i in range(len(x)):
                _pace(self.cfg.rate_hz, start, index)
                try:
                    xi = coerce(x[i], self.input_shape)
                except FrameError as exc:
                    self.bad.add("shape", f"{self.name}[{i}]: {exc}")
                    continue
                label = int(y[i]) if y is not None else None
                yield Sample(xi, label, index, self.name, time.monotonic())
                index += 1
            if not self.cfg.loop:
                return


def decode_image(data: bytes | Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """PNG/JPEG → (C, H, W) float32 in [0, 1], converted and resized to the input shape."""
    from PIL import Image, UnidentifiedImageError

    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise FrameError(f"images need a (1|3, H, W) input, this partition takes {input_shape}")
    channels, height, width = input_shape
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FrameError(f"undecodable image: {exc}") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


class ImageDirectory:
    """Every image matching ``glob`` in a directory, in name order."""

    def __init__(self, cfg: ImagesSource, input_shape: tuple[int, ...], bad: BadInputs) -> None:
        self.cfg, self.input_shape, self.bad = cfg, input_shape, bad
        self.name = f"images:{cfg.directory.name}"

    def __iter__(self) -> Iterator[Sample]:
        index = 0
        start = time.monotonic()
        while True:
            files = sorted(self.cfg.directory.glob(self.cfg.glob))
            for path in files:
                _pace(self.cfg.rate_hz, start, index)
                try:
                    x = np.ascontiguousarray(decode_image(path, self.input_shape))
                except FrameError as exc:
                    self.bad.add("image", f"{path.name}: {exc}")
                    continue
                yield Sample(x, None, index, self.name, time.monotonic())
                index += 1
            if not self.cfg.loop or not files:
                return


NPY_MAGIC = b"\x93NUMPY"
CODEC_MAGIC = b"KNCF"


def decode_frame(payload: bytes, input_shape: tuple[int, ...],
                 max_bytes: int = 64 * 2**20) -> np.ndarray:
    """A frame from a sensor: a knet codec frame, a ``.npy`` array, or a PNG/JPEG image."""
    if len(payload) > max_bytes:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {max_bytes}")
    if payload.startswith(CODEC_MAGIC):
        from agent.codec import CodecError, decode

        try:
            return coerce(decode(payload, max_bytes=max_bytes), input_shape)
        except CodecError as exc:
            raise FrameError(f"bad codec frame: {exc}") from None
    if payload.startswith(NPY_MAGIC):
        try:
            arr = np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FrameError(f"bad .npy frame: {exc}") from None
        return coerce(arr, input_shape)
    return decode_image(payload, input_shape)


class MqttFrames:
    """Frames that the MQTT link hands in (``offer``) and the pipeline reads (iteration).

    ``offer`` blocks while the queue is full: paho then stops reading the socket and the
    broker holds the QoS 1 frames, which is back-pressure all the way to the camera.
    """

    def __init__(self, cfg: MqttSource, input_shape: tuple[int, ...], bad: BadInputs,
                 queue_size: int = 64) -> None:
        self.cfg, self.input_shape, self.bad = cfg, input_shape, bad
        self.name = "mqtt"
        self._queue: queue.Queue[Sample | None] = queue.Queue(maxsize=queue_size)
        self._index = 0

    def offer(self, payload: bytes, label: int | None = None, timeout: float = 30.0) -> bool:
        try:
            x = decode_frame(payload, self.input_shape)
        except FrameError as exc:
            self.bad.add("frame", str(exc))
            return False
        sample = Sample(np.ascontiguousarray(x), label, self._index, self.name, time.monotonic())
        self._index += 1
        try:
            self._queue.put(sample, timeout=timeout)
        except queue.Full:
            self.bad.add("overflow", "input queue full for 30 s; frame dropped")
            return False
        return True

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[Sample]:
        while (item := self._queue.get()) is not None:
            yield item


def make_source(cfg: NpzSource | ImagesSource | MqttSource, input_shape: tuple[int, ...],
                bad: BadInputs) -> NpzReplay | ImageDirectory | MqttFrames:
    if isinstance(cfg, NpzSource):
        return NpzReplay(cfg, input_shape, bad)
    if isinstance(cfg, ImagesSource):
        return ImageDirectory(cfg, input_shape, bad)
    return MqttFrames(cfg, input_shape, bad)
