"""What every input source yields, and frames pushed to the agent.

A ``Sample`` (one input of the partition's shape), the ``BadInputs`` counts of what was
skipped and why, ``coerce`` and the frame decoders (a knet codec frame, a ``.npy`` array, a
PNG/JPEG image), and ``MqttFrames``, the queue that MQTT-borne frames are offered to.

The sources (``agent.infer.sources``) and a chain's upstream relay (``agent.infer.chain``) both
build on these, so the relay does not import the sources whose ``make_source`` builds it (no import
cycle; the contracts in pyproject.toml's ``[tool.importlinter]`` keep it that way).
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.config import MqttSource
from agent.errors import KnetAgentError

log = logging.getLogger(__name__)

# Decoders fed untrusted bytes raise far more than ValueError/OSError: numpy's .npy header
# parser raises tokenize.TokenError or SyntaxError, Pillow's plugins struct.error,
# IndexError, TypeError... A bad input must be counted and skipped, so parsing catches
# Exception (never BaseException: KeyboardInterrupt/SystemExit still stop the agent).
UNTRUSTED_PARSE_ERRORS = (Exception,)


@dataclass(frozen=True)
class Sample:
    x: np.ndarray  # float32, C-contiguous, the partition's input shape (no batch dimension)
    label: int | None
    source_id: str  # e.g. "npz:inputs.npz", "images:frames", "mqtt"
    index: int  # counts the samples this source yielded, from 0
    t_read: float = field(default_factory=time.monotonic)


class FrameError(KnetAgentError, ValueError):
    """A frame that cannot be turned into an input of the expected shape."""


class BadInputs:
    """Counts of skipped inputs by reason (``source.bad_inputs``), shared with metrics.

    ``listener(reason)`` is called for each one, e.g. a Prometheus counter's
    ``labels(reason).inc``; it must not raise.
    """

    def __init__(self, listener: Callable[[str], None] | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._listener = listener

    def add(self, reason: str, detail: str = "") -> None:
        with self._lock:
            self.counts[reason] += 1
            n = self.counts[reason]
        if self._listener is not None:
            self._listener(reason)
        if n <= 3 or n % 1000 == 0:  # a flood of bad frames must not flood the log
            log.warning("bad input skipped (%s, %d so far): %s", reason, n, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def coerce(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """An array of the input shape as float32, or FrameError."""
    if not np.issubdtype(x.dtype, np.number):
        raise FrameError(f"dtype {x.dtype} is not numeric")
    if tuple(x.shape) != input_shape:
        if x.size == int(np.prod(input_shape)) and x.ndim in (1, len(input_shape) + 1):
            x = x.reshape(input_shape)  # flattened, or with a batch axis of 1
        else:
            raise FrameError(f"shape {tuple(x.shape)} != expected {input_shape}")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise FrameError(f"dtype {x.dtype} is complex")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise FrameError("contains NaN or inf")
    return np.ascontiguousarray(x)


MAX_IMAGE_PIXELS = 4096 * 4096  # far below Pillow's own limit, which assumes a desktop


def decode_image(data: bytes | Path, input_shape: tuple[int, ...], *,
                 resize: bool = True) -> np.ndarray:
    """PNG/JPEG → (C, H, W) float32 in [0, 1], converted (and resized) to the input shape."""
    from PIL import Image

    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise FrameError(f"images need a (1|3, H, W) input, this partition takes {input_shape}")
    channels, height, width = input_shape
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as src:
            if src.width * src.height > MAX_IMAGE_PIXELS:  # header only: nothing decoded yet
                raise FrameError(f"image of {src.width}x{src.height} pixels exceeds "
                                 f"{MAX_IMAGE_PIXELS} (a decompression bomb on a 4 GB device)")
            img = src.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                if not resize:
                    raise FrameError(f"image is {img.size[0]}x{img.size[1]}, the input "
                                     f"{width}x{height} (source.resize = false)")
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except FrameError:
        raise
    except UNTRUSTED_PARSE_ERRORS as exc:
        raise FrameError(f"undecodable image: {type(exc).__name__}: {exc}") from None
    return np.ascontiguousarray(arr[None] if channels == 1 else arr.transpose(2, 0, 1))


NPY_MAGIC = b"\x93NUMPY"
CODEC_MAGIC = b"KNCF"


def decode_frame(payload: bytes, input_shape: tuple[int, ...],
                 max_bytes: int = 64 * 2**20) -> np.ndarray:
    """A frame from a sensor: a knet codec frame, a ``.npy`` array, or a PNG/JPEG image.

    The first bytes decide: ``KNCF`` (``agent.wire.codec``), the ``.npy`` magic, else Pillow.
    Raises FrameError, never anything else, so the caller can count and skip.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise FrameError(f"payload is a {type(payload).__name__}, not bytes")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {max_bytes}")
    if payload.startswith(CODEC_MAGIC):
        from agent.wire.codec import CodecError, decode

        try:
            return coerce(decode(payload, max_bytes=max_bytes), input_shape)
        except CodecError as exc:
            raise FrameError(f"bad codec frame: {exc}") from None
    if payload.startswith(NPY_MAGIC):
        try:
            arr = np.load(io.BytesIO(payload), allow_pickle=False)
        except UNTRUSTED_PARSE_ERRORS as exc:
            raise FrameError(f"bad .npy frame: {type(exc).__name__}: {exc}") from None
        return coerce(arr, input_shape)
    return decode_image(payload, input_shape)


class MqttFrames:
    """Frames that the MQTT link hands in (``offer``) and the pipeline reads (iteration).

    ``offer`` blocks while the queue is full: paho then stops reading the socket and the
    broker holds the QoS 1 frames, which is back-pressure all the way to the camera.
    """

    def __init__(self, cfg: MqttSource, input_shape: tuple[int, ...], bad: BadInputs,
                 queue_size: int | None = None) -> None:
        self.cfg, self.input_shape, self.bad = cfg, input_shape, bad
        self.name = "mqtt"
        self._queue: queue.Queue[Sample | None] = queue.Queue(
            maxsize=queue_size or cfg.queue_size)
        self._index = 0

    def offer(self, payload: bytes, label: int | None = None, timeout: float = 30.0) -> bool:
        try:
            x = decode_frame(payload, self.input_shape)
        except FrameError as exc:
            self.bad.add("frame", str(exc))
            return False
        sample = Sample(x, label, self.name, self._index)
        self._index += 1
        try:
            self._queue.put(sample, timeout=timeout)
        except queue.Full:
            self.bad.add("overflow", f"input queue full for {timeout:g} s; frame dropped")
            return False
        return True

    def close(self) -> None:
        """End the iteration; never blocks, even with a full queue and no reader."""
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()

    def __iter__(self) -> Iterator[Sample]:
        while (item := self._queue.get()) is not None:
            yield item
