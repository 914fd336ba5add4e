"""Input sources: bad inputs are counted by reason and skipped, never fatal."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.config import ImagesSource, MqttSource, NpzSource
from agent.infer.sources import (
    BadInputs,
    FrameError,
    ImageDirectory,
    MqttFrames,
    NpzReplay,
    Sample,
    decode_frame,
    decode_image,
    make_source,
)

SHAPE = (1, 8, 8)


def npz_cfg(path: Path, **kw: object) -> NpzSource:
    return NpzSource(kind="npz", path=path, **kw)  # type: ignore[arg-type]


def test_npz_replay_yields_samples_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, *SHAPE)).astype(np.float64)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(5))
    bad = BadInputs()
    samples = list(make_source(npz_cfg(tmp_path / "in.npz"), SHAPE, bad))
    assert [s.index for s in samples] == [0, 1, 2, 3, 4] and [s.label for s in samples] == [
        0, 1, 2, 3, 4]
    s = samples[0]
    assert isinstance(s, Sample) and s.source_id == "npz:in.npz"
    assert s.x.dtype == np.float32 and s.x.shape == SHAPE and s.x.flags.c_contiguous
    np.testing.assert_allclose(s.x, x[0].astype(np.float32))
    assert bad.total == 0


def test_npz_bad_rows_are_counted_and_skipped(tmp_path: Path) -> None:
    x = np.zeros((4, 64), np.float32)  # flattened rows are reshaped to the input shape
    x[1] = np.nan
    np.savez(tmp_path / "in.npz", x=x, labels=np.array([1, 2, 3, 4]))
    counted: list[str] = []
    bad = BadInputs(listener=counted.append)
    src = NpzReplay(npz_cfg(tmp_path / "in.npz", y_key="labels"), SHAPE, bad)
    samples = list(src)
    assert [s.label for s in samples] == [1, 3, 4] and [s.index for s in samples] == [0, 1, 2]
    assert bad.counts == {"shape": 1} and counted == ["shape"]

    np.savez(tmp_path / "wrong.npz", x=np.zeros((3, 2, 8, 8)), y=np.arange(2))
    bad = BadInputs()
    assert list(NpzReplay(npz_cfg(tmp_path / "wrong.npz"), SHAPE, bad)) == []
    assert bad.counts == {"npz_labels": 1, "shape": 3}


def test_npz_without_labels_and_with_odd_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, *SHAPE)))
    assert [s.label for s in NpzReplay(npz_cfg(tmp_path / "a.npz"), SHAPE, BadInputs())] == [
        None, None]
    np.savez(tmp_path / "b.npz", x=np.zeros((2, *SHAPE)), y=np.array([1.0, 0.5]))
    assert [s.label for s in NpzReplay(npz_cfg(tmp_path / "b.npz"), SHAPE, BadInputs())] == [
        1, None]


def _corrupt_member(src: Path, dst: Path, member: str) -> None:
    """Copy an .npz, flipping bytes inside one member's (deflated) data."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == member:
                data = data[:10] + b"\x00garbage" + data[18:]  # breaks the .npy header
            zout.writestr(info, data)


def test_corrupt_npz_is_counted_not_fatal(tmp_path: Path) -> None:
    np.savez(tmp_path / "ok.npz", x=np.zeros((3, *SHAPE)), y=np.arange(3))
    _corrupt_member(tmp_path / "ok.npz", tmp_path / "bad_y.npz", "y.npy")
    bad = BadInputs()
    samples = list(NpzReplay(npz_cfg(tmp_path / "bad_y.npz"), SHAPE, bad))
    assert len(samples) == 3 and all(s.label is None for s in samples)  # inputs survive
    assert bad.counts == {"npz_labels": 1}

    _corrupt_member(tmp_path / "ok.npz", tmp_path / "bad_x.npz", "x.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    bad = BadInputs()
    for name in ("bad_x.npz", "junk.npz", "missing.npz", "plain.npy"):
        assert list(NpzReplay(npz_cfg(tmp_path / name), SHAPE, bad)) == []
    np.savez(tmp_path / "nokey.npz", images=np.zeros((2, *SHAPE)))
    assert list(NpzReplay(npz_cfg(tmp_path / "nokey.npz"), SHAPE, bad)) == []
    assert bad.counts == {"npz_unreadable": 5}


def test_npz_loop_and_rate(tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", x=np.zeros((2, *SHAPE)))
    it = iter(NpzReplay(npz_cfg(tmp_path / "in.npz", loop=True, rate_hz=200.0), SHAPE,
                        BadInputs()))
    t0 = time.monotonic()
    first = [next(it) for _ in range(9)]
    assert [s.index for s in first] == list(range(9))
    assert time.monotonic() - t0 >= 8 / 200 * 0.9  # paced, not as fast as possible
    # a looping source with nothing usable ends instead of spinning
    np.savez(tmp_path / "allbad.npz", x=np.full((2, *SHAPE), np.nan))
    bad = BadInputs()
    assert list(NpzReplay(npz_cfg(tmp_path / "allbad.npz", loop=True), SHAPE, bad)) == []
    assert bad.counts == {"shape": 2}


def test_npz_max_frames_wraps_a_loop_and_verifies_a_file_again_only_when_it_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    import agent.infer.sources as sources

    path = tmp_path / "in.npz"
    np.savez(path, x=np.arange(3 * int(np.prod(SHAPE)), dtype=np.float32).reshape(3, *SHAPE))
    verified: list[bool] = []
    real = sources._NpyRows

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, p: Path, key: str, verify: bool = True) -> None:
            verified.append(verify)
            super().__init__(p, key, verify)

    monkeypatch.setattr(sources, "_NpyRows", Spy)
    samples = list(NpzReplay(npz_cfg(path, loop=True, max_frames=8), SHAPE, BadInputs()))
    assert [s.index for s in samples] == list(range(8))  # 3 + 3 + 2: wrapped twice
    row = int(np.prod(SHAPE))
    assert [float(s.x.flat[0]) for s in samples][:4] == [0.0, row, 2.0 * row, 0.0]
    assert verified == [True, False, False]  # the CRC pass once, not on every wrap
    assert len(list(NpzReplay(npz_cfg(path, max_frames=2), SHAPE, BadInputs()))) == 2
    # the file is replaced by a damaged one mid-loop: the next pass checks it and stops
    replay = iter(NpzReplay(npz_cfg(path, loop=True), SHAPE, bad := BadInputs()))
    assert [next(replay).index for _ in range(3)] == [0, 1, 2]
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo("x.npy").header_offset + 200
    data[offset] ^= 0xFF  # a payload byte: only the CRC can tell
    before = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before + 10**9, before + 10**9))  # coarse clocks: a later mtime
    assert list(replay) == [] and bad.counts == {"npz_unreadable": 1}
    assert verified[-1] is True


def _npz_with_short_member(path: Path, rows: int, promised: int, compression: int) -> None:
    """An archive whose x.npy header promises more rows than the member holds."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (promised, *SHAPE)})
    data = np.arange(rows * 64, dtype="<f4").tobytes()
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("x.npy", buf.getvalue() + data)


def test_npz_streams_stored_compressed_and_fortran_members(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((6, *SHAPE)).astype(np.float32)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=np.arange(6))
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(x))
    np.savez(tmp_path / "be.npz", x=x.astype(">f8"))
    for name in ("c.npz", "f.npz", "be.npz"):
        samples = list(NpzReplay(npz_cfg(tmp_path / name), SHAPE, BadInputs()))
        np.testing.assert_allclose(np.stack([s.x for s in samples]), x, rtol=1e-6)
        assert all(s.x.dtype == np.float32 and s.x.flags.c_contiguous for s in samples)


def test_npz_short_member_is_counted(tmp_path: Path) -> None:
    _npz_with_short_member(tmp_path / "stored.npz", 3, 5, zipfile.ZIP_STORED)
    bad = BadInputs()
    assert list(NpzReplay(npz_cfg(tmp_path / "stored.npz"), SHAPE, bad)) == []  # at open
    assert bad.counts == {"npz_unreadable": 1}
    _npz_with_short_member(tmp_path / "deflated.npz", 3, 5, zipfile.ZIP_DEFLATED)
    bad = BadInputs()
    samples = list(NpzReplay(npz_cfg(tmp_path / "deflated.npz"), SHAPE, bad))
    assert len(samples) == 3 and bad.counts == {"npz_unreadable": 1}  # where it ends


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_image_directory_converts_resizes_and_skips_junk(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "a.png").write_bytes(_png(np.full((8, 8), 255, np.uint8)))
    (frames / "b.png").write_bytes(_png(np.zeros((20, 30, 3), np.uint8)))  # RGB, other size
    (frames / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (frames / "d.png").mkdir()  # a directory matching the glob is not an input
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(frames / "e.jpg")
    bad = BadInputs()
    cfg = ImagesSource(kind="images", directory=frames)
    samples = list(make_source(cfg, SHAPE, bad))
    assert [s.source_id for s in samples] == ["images:frames"] * 2
    assert samples[0].x.shape == SHAPE and samples[0].x.max() == pytest.approx(1.0)
    assert samples[1].x.shape == SHAPE and samples[1].x.max() == 0.0
    assert bad.counts == {"image": 1}

    rgb = list(ImageDirectory(cfg, (3, 4, 4), BadInputs()))
    assert rgb[0].x.shape == (3, 4, 4) and rgb[0].x.flags.c_contiguous
    strict = BadInputs()
    kept = list(ImageDirectory(cfg.model_copy(update={"resize": False}), SHAPE, strict))
    assert len(kept) == 1 and strict.counts == {"image": 2}
    looping = BadInputs()
    assert list(ImageDirectory(cfg.model_copy(update={"glob": "c.png", "loop": True}), SHAPE,
                               looping)) == []
    assert looping.counts == {"image": 1}
    wrapped = list(ImageDirectory(cfg.model_copy(update={"loop": True, "max_frames": 5}), SHAPE,
                                  BadInputs()))
    assert [s.index for s in wrapped] == list(range(5))  # a, b, a, b, a
    assert [float(s.x.max()) for s in wrapped] == pytest.approx([1.0, 0.0, 1.0, 0.0, 1.0])


def test_decode_frame_handles_npy_images_and_codec_frames() -> None:
    from agent.wire.codec import encode

    x = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x[None])  # a batch of one is fine
    np.testing.assert_array_equal(decode_frame(buf.getvalue(), SHAPE), x)
    np.testing.assert_allclose(decode_frame(encode(x, "raw"), SHAPE), x)
    img = decode_frame(_png((np.arange(64) * 4).astype(np.uint8).reshape(8, 8)), SHAPE)
    assert img.shape == SHAPE and img.min() >= 0 and img.max() <= 1
    rgba = decode_frame(_png(np.zeros((5, 5, 4), np.uint8), "RGBA"), (3, 8, 8))
    assert rgba.shape == (3, 8, 8) and rgba.flags.c_contiguous


@pytest.mark.parametrize("payload", [
    b"", b"hello", b"\x89PNG\r\n\x1a\n broken", b"KNCF\x01\x02", b"\x93NUMPY junk",
    b"\xff\xd8\xff\xe0 not really a jpeg",
])
def test_undecodable_frames_raise_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(payload, SHAPE)


def test_frames_of_the_wrong_shape_or_kind_raise_frame_error() -> None:
    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    for arr, reason in [(np.zeros((2, 8, 8), np.float32), "shape"),
                        (np.zeros(SHAPE, np.complex64), "complex"),
                        (np.array(["a"] * 64).reshape(SHAPE), "not numeric"),
                        (np.full(SHAPE, np.inf, np.float32), "NaN or inf")]:
        with pytest.raises(FrameError, match=reason):
            decode_frame(npy(arr), SHAPE)
    with pytest.raises(FrameError, match=r"exceeds"):
        decode_frame(npy(np.zeros(SHAPE)), SHAPE, max_bytes=64)
    with pytest.raises(FrameError, match=r"images need"):
        decode_image(_png(np.zeros((8, 8), np.uint8)), (64,))
    with pytest.raises(FrameError, match=r"not bytes"):
        decode_frame("text", SHAPE)  # type: ignore[arg-type]


def test_mqtt_frames_queue_counts_bad_frames_and_closes() -> None:
    bad = BadInputs()
    src = make_source(MqttSource(kind="mqtt", queue_size=2), SHAPE, bad)
    assert isinstance(src, MqttFrames)
    buf = io.BytesIO()
    np.save(buf, np.ones(SHAPE, np.float32))
    assert src.offer(buf.getvalue(), label=7)
    assert not src.offer(b"garbage")
    assert src.offer(buf.getvalue())
    assert not src.offer(buf.getvalue(), timeout=0.01)  # full: dropped, counted
    assert bad.counts == {"frame": 1, "overflow": 1}
    got: list[Sample] = []
    reader = threading.Thread(target=lambda: got.extend(src))
    src.close()  # never blocks, even on a full queue
    reader.start()
    reader.join(5)
    assert not reader.is_alive() and len(got) <= 2
    assert all(s.source_id == "mqtt" for s in got)


def test_oversized_images_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.infer.frames

    monkeypatch.setattr(agent.infer.frames, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(FrameError, match=r"exceeds 100"):
        decode_frame(_png(np.zeros((11, 10), np.uint8)), SHAPE)


def test_npz_fast_path_checks_every_row(tmp_path: Path) -> None:
    x = np.random.default_rng(2).random((19, *SHAPE)).astype(np.float32)  # rows of SHAPE
    x[2, 0, 0, 0] = np.nan
    x[17, 0, 3, 3] = np.inf
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(19))
    bad = BadInputs()
    samples = list(NpzReplay(npz_cfg(tmp_path / "in.npz"), SHAPE, bad))
    assert [s.label for s in samples] == [i for i in range(19) if i not in (2, 17)]
    assert [s.index for s in samples] == list(range(17))
    assert bad.counts == {"shape": 2}
    assert all(s.x.flags.c_contiguous and s.x.shape == SHAPE for s in samples)
    np.testing.assert_array_equal(samples[2].x, x[3])
