"""Batch envelopes (wire version 2) without a broker: the format, its refusals, the codec
split per sample, the agent's batcher and the pipeline's time-bound flush."""

from __future__ import annotations

import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import UplinkSection
from agent.infer.pipeline import Pipeline, Stage
from agent.mqtt.batcher import Batcher
from agent.wire.codec import (
    CodecError,
    UnknownCodecError,
    batchable,
    decode,
    encode,
    split_batch,
)
from agent.wire.envelope import (
    MAX_BATCH,
    BatchEnvelope,
    Envelope,
    EnvelopeError,
    EnvelopeVersionError,
    unpack_any,
)

RNG = np.random.default_rng(7)


def batch(n: int = 5, codec: str = "uint8+lz4", first_seq: int = 10,
          shape: tuple[int, ...] = (4, 3, 3)) -> tuple[BatchEnvelope, np.ndarray]:
    x = np.maximum(RNG.standard_normal((n, *shape)), 0).astype(np.float32)
    seqs = list(range(first_seq, first_seq + n))
    table = BatchEnvelope.table(seqs, [1000.0 + s for s in seqs],
                                [s if s % 2 else None for s in seqs],
                                [s % 10 for s in seqs], [None] * n,
                                [0.5 if s % 3 else None for s in seqs])
    return BatchEnvelope(device="dev-a", session=3, model_version=2, boundary=1,
                         samples=table, payload=encode(x, codec), meta={"model": "m"}), x


def with_crc(body: bytes) -> bytes:
    """A message whose CRC matches: the parser must refuse it for what it says."""
    return body + struct.pack("<I", zlib.crc32(body))


def test_round_trip_gives_each_sample_its_own_envelope() -> None:
    env, x = batch()
    got = unpack_any(env.pack())
    assert isinstance(got, BatchEnvelope)
    assert (got.device, got.session, got.model_version, got.boundary, got.meta) == \
        ("dev-a", 3, 2, 1, {"model": "m"})
    split = split_batch(got.payload)
    assert split.shape == (5, 4, 3, 3) and split.finite is not None and split.finite.all()
    whole = decode(got.payload)
    samples = got.envelopes(split.frames)
    assert [e.seq for e in samples] == [10, 11, 12, 13, 14]
    assert [e.timestamp for e in samples] == [1010.0, 1011.0, 1012.0, 1013.0, 1014.0]
    assert [e.meta for e in samples] == [{"model": "m"}, {"model": "m", "index": 11},
                                         {"model": "m"}, {"model": "m", "index": 13},
                                         {"model": "m"}]
    assert [e.label for e in samples] == [0, 1, 2, 3, 4]
    assert all(e.prediction is None for e in samples)
    assert [e.confidence for e in samples] == [0.5, 0.5, None, 0.5, 0.5]
    bound = (x.max() - x.min()) / 255 / 2 + 1e-6  # the batch's one quantisation range
    for i, e in enumerate(samples):
        assert (e.device, e.session, e.model_version, e.boundary) == ("dev-a", 3, 2, 1)
        one = decode(e.payload)
        assert one.shape == (1, 4, 3, 3)
        assert np.array_equal(one[0], whole[i])
        assert np.abs(one[0] - x[i]).max() <= bound


@pytest.mark.parametrize("codec", ["raw", "fp16", "uint8", "int8+lz4",
                                   "uint8:per_channel=1+lz4", "int8:per_channel=1"])
def test_split_per_sample_equals_the_batch_decoded(codec: str) -> None:
    x = RNG.standard_normal((6, 3, 2, 5)).astype(np.float32)
    split = split_batch(encode(x, codec))
    assert split.finite is not None and split.finite.all()
    whole = decode(encode(x, codec))
    for i, f in enumerate(split.frames):
        assert np.array_equal(decode(f)[0], whole[i])


def test_codecs_that_do_not_split_are_refused_for_batches() -> None:
    assert batchable("uint8+lz4") and batchable("raw") and not batchable("zfp")
    with pytest.raises(UnknownCodecError, match="do not split"):
        split_batch(encode(np.ones((4, 3), np.float32), "zfp"))
    with pytest.raises(ValidationError, match="batch_size > 1 needs a codec"):
        UplinkSection(batch_size=8, codec="defer")
    with pytest.raises(ValidationError, match="batch_size"):
        UplinkSection(batch_size=0)
    assert UplinkSection().batch_size == 1 and UplinkSection().batch_wait_s == 0.05


def test_a_version_1_reader_refuses_a_batch_with_a_clear_reason() -> None:
    data = batch()[0].pack()
    # Envelope.unpack is the version-1 parser, unchanged: what older trainers run
    with pytest.raises(EnvelopeVersionError, match="envelope version 2; this build reads 1"):
        Envelope.unpack(data)
    one = Envelope(device="dev-a", session=1, seq=1, timestamp=1.0, model_version=1,
                   boundary=1, payload=encode(np.ones((1, 2), np.float32), "raw")).pack()
    assert isinstance(unpack_any(one), Envelope)  # both formats, one entry point
    with pytest.raises(EnvelopeVersionError, match="not a batch"):
        BatchEnvelope.unpack(one)
    future = bytearray(data)
    future[4] = 3
    with pytest.raises(EnvelopeVersionError, match="version 3; this build reads 1 and 2"):
        unpack_any(bytes(future))


def test_every_truncation_is_a_named_error() -> None:
    data = batch()[0].pack()
    for end in range(len(data)):
        with pytest.raises(EnvelopeError):
            unpack_any(data[:end])
    for end in range(30, len(data) - 4):  # truncated, then a valid CRC over what is left
        with pytest.raises(EnvelopeError):
            unpack_any(with_crc(data[:end]))


def test_hostile_headers_are_refused_before_any_allocation() -> None:
    data = batch()[0].pack()
    body = bytearray(data[:-4])
    struct.pack_into("<I", body, 20, 2**32 - 1)  # count: four billion samples
    with pytest.raises(EnvelopeError, match=f"limit 1-{MAX_BATCH}"):
        unpack_any(with_crc(bytes(body)))
    struct.pack_into("<I", body, 20, MAX_BATCH)  # within the limit, more than the bytes
    hostile = with_crc(bytes(body))
    tracemalloc.start()
    try:
        with pytest.raises(EnvelopeError, match="truncated in the sample table"):
            unpack_any(hostile)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak  # the declared table (151 kB) was never allocated
    struct.pack_into("<I", body, 20, 0)
    with pytest.raises(EnvelopeError, match="limit"):
        unpack_any(with_crc(bytes(body)))
    big = batch()[0]
    with pytest.raises(EnvelopeError, match="exceeds the 64 limit"):
        unpack_any(big.pack(), max_payload=64)


def test_sample_tables_that_break_dedup_or_time_are_refused() -> None:
    env, _ = batch()
    for field, value, match in (("seq", 10, "strictly increasing"),
                                ("timestamp", np.nan, "not finite"),
                                ("flags", 16, "flag bits")):
        table = env.samples.copy()
        table[field][3] = value
        bad = BatchEnvelope(env.device, env.session, env.model_version, env.boundary, table,
                            env.payload, env.meta)
        with pytest.raises(EnvelopeError, match=match):
            unpack_any(bad.pack())


def test_random_corruption_only_ever_raises_named_errors() -> None:
    data = batch()[0].pack()
    rng = np.random.default_rng(0)
    for _ in range(300):
        body = bytearray(data[:-4])
        for pos in rng.integers(0, len(body), rng.integers(1, 4)):
            body[pos] = int(rng.integers(0, 256))
        try:
            env = unpack_any(with_crc(bytes(body)))
            if isinstance(env, BatchEnvelope):
                env.envelopes(split_batch(env.payload, max_bytes=1 << 20).frames)
        except (EnvelopeError, CodecError):
            continue


def test_the_fleet_console_counts_each_sample_of_a_batch() -> None:
    from knet_lab.fleet import Console, DeviceView

    view = DeviceView()
    env, _ = batch(4)
    Console._activation(view, env.pack())
    Console._activation(view, env.pack())  # a re-delivery
    Console._activation(view, b"KNAE\x02garbage")
    assert view.act_keys == {(3, s) for s in range(10, 14)}
    assert view.act_duplicates == 4 and view.act_bad == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_batcher_sends_at_size_or_at_its_time_bound() -> None:
    clock = FakeClock()
    b = Batcher(size=4, wait_s=0.05, max_bytes=1 << 20, clock=clock)
    one = np.zeros((1, 8), np.float32)
    assert b.due_in() is None
    assert b.add("k1", one, 1) == [] and b.add("k1", one, 2) == []
    assert b.add("k2", one, 3) == []  # another boundary/version: its own batch
    clock.now += 0.03
    assert b.due_in() == pytest.approx(0.02) and b.take_due() == []
    full = b.add("k1", one, 4) + b.add("k1", one, 5)
    assert [x.items for x in full] == [[1, 2, 4, 5]]  # the size bound, before time
    clock.now += 0.02
    assert b.due_in() == 0.0
    due = b.take_due()
    assert [(x.key, x.items) for x in due] == [("k2", [3])]
    assert len(b) == 0 and b.due_in() is None
    assert b.add("k1", one, 6) == []
    assert [x.items for x in b.take_due(force=True)] == [[6]]  # end of stream
    assert due[0].stacked().shape == (1, 8)


def test_batcher_byte_bound_keeps_messages_under_the_link_limit() -> None:
    b = Batcher(size=100, wait_s=1.0, max_bytes=3 * 32 * 4, clock=FakeClock())
    one = np.zeros((1, 32), np.float32)
    assert b.add("k", one, 1) == [] and b.add("k", one, 2) == []
    out = b.add("k", one, 3)
    assert [x.items for x in out] == [[1, 2, 3]] and out[0].stacked().shape == (3, 32)


def test_pipeline_flushes_a_held_batch_on_its_time_bound() -> None:
    """A source that stops sending after 3 items: the batch of 100 must still go out by
    time, while the stream is open (a finite source would force it at the end)."""
    batcher = Batcher(size=100, wait_s=0.05, max_bytes=1 << 20)
    got: list[list[int]] = []
    done = threading.Event()
    release = threading.Event()

    def source():  # 3 items, then it waits (an MQTT source with nothing arriving)
        yield from range(3)
        release.wait(30)

    def encode_items(items: list[int]) -> list[list[int]] | None:
        out = [x.items for i in items for x in batcher.add("k", np.zeros((1, 1)), i)]
        return out or None

    def flush(force: bool) -> list[list[int]] | None:
        return [x.items for x in batcher.take_due(force)] or None

    def sink(batches: list[list[int]]) -> None:
        got.extend(batches)
        done.set()

    stages = [Stage("encode", encode_items, 8, batch=8, flush=flush, due_in=batcher.due_in),
              Stage("sink", sink, 8)]
    t0 = time.monotonic()  # before the first item can reach the batcher
    pipe = Pipeline(source(), stages).start()
    try:
        assert done.wait(30), "the held batch was never flushed"
        assert time.monotonic() - t0 >= 0.05
        assert got == [[0, 1, 2]]
    finally:
        release.set()
        pipe.stop()
