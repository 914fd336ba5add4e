"""The spool: FIFO, byte bound and policies, persistence, SIGKILL safety, damaged files."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest
from mqtt_helpers import check_payload, read_until, spawn_helper

from agent.mqtt.spool import FILE_NAME, Spool

T = "knet/v1/lab/dev/act"


def test_fifo_peek_ack(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        for i in range(10):
            assert spool.append(T, bytes([i]) * 10, 1)
        assert len(spool) == 10
        assert spool.bytes == 10 * (len(T) + 10)
        recs = spool.peek(4)
        assert [r.payload[0] for r in recs] == [0, 1, 2, 3]
        assert [r.payload[0] for r in spool.peek(100, after=recs[-1].id)] == list(range(4, 10))
        assert spool.ack(recs[1].id)
        assert not spool.ack(recs[1].id)  # idempotent
        assert spool.ack_many([recs[0].id, recs[2].id, 99999]) == 2
        assert [r.payload[0] for r in spool] == list(range(3, 10))
        assert len(spool) == 7 and spool.bytes == 7 * (len(T) + 10)
        assert all(r.topic == T and r.qos == 1 for r in spool)


def test_ids_never_reused_after_emptying(tmp_path: Path) -> None:
    """A drain cursor 'after id N' must see records appended after the spool emptied."""
    with Spool(tmp_path, 1 << 20) as spool:
        spool.append(T, b"a", 1)
        (first,) = spool.peek()
        spool.ack(first.id)
    with Spool(tmp_path, 1 << 20) as spool:
        spool.append(T, b"b", 1)
        assert spool.peek(10, after=first.id)[0].payload == b"b"


def test_drop_oldest_keeps_bound(tmp_path: Path) -> None:
    size = len(T) + 100
    with Spool(tmp_path, 10 * size, "drop_oldest") as spool:
        for i in range(25):
            assert spool.append(T, bytes([i]) * 100, 1)
            assert spool.bytes <= 10 * size
        assert len(spool) == 10
        assert [r.payload[0] for r in spool] == list(range(15, 25))
        assert spool.dropped_oldest == 15 and spool.dropped_newest == 0
        # One big record evicts as many old ones as it needs.
        assert spool.append(T, b"x" * (3 * size - len(T)), 1)
        assert spool.dropped_oldest == 18 and spool.bytes <= 10 * size
        assert next(iter(spool)).payload[0] == 18


def test_drop_newest_keeps_old(tmp_path: Path) -> None:
    size = len(T) + 100
    with Spool(tmp_path, 10 * size, "drop_newest") as spool:
        results = [spool.append(T, bytes([i]) * 100, 1) for i in range(25)]
        assert results == [True] * 10 + [False] * 15
        assert [r.payload[0] for r in spool] == list(range(10))
        assert spool.dropped_newest == 15 and spool.dropped_oldest == 0
        spool.ack(spool.peek(1)[0].id)
        assert spool.append(T, bytes([99]) * 100, 1)


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_record_larger_than_spool_is_refused(tmp_path: Path, policy: str) -> None:
    with Spool(tmp_path, 1000, policy) as spool:  # type: ignore[arg-type]
        spool.append(T, b"keep", 1)
        assert not spool.append(T, bytes(2000), 1)
        assert [r.payload for r in spool] == [b"keep"]
        assert spool.dropped_newest == 1


def test_persists_across_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, 1 << 20) as spool:
        for i in range(100):
            spool.append(f"{T}/{i % 3}", i.to_bytes(4, "little"), 1 + i % 2)
        spool.ack_many(r.id for r in spool.peek(30))
        nbytes = spool.bytes
    with Spool(tmp_path, 1 << 20) as spool:
        recs = list(spool)
        assert [int.from_bytes(r.payload, "little") for r in recs] == list(range(30, 100))
        assert [r.topic for r in recs] == [f"{T}/{i % 3}" for i in range(30, 100)]
        assert [r.qos for r in recs] == [1 + i % 2 for i in range(30, 100)]
        assert len(spool) == 70 and spool.bytes == nbytes


@pytest.mark.parametrize("batch", [1, 7])
def test_sigkill_while_appending(tmp_path: Path, batch: int) -> None:
    """Kill a writer mid-loop three times: every reported append survives, in order, whole
    (batch 7: group commits with append_many)."""
    reported = -1
    for round_ in range(3):
        proc = spawn_helper("spool-writer", str(tmp_path), "--batch", str(batch))
        target = reported + 300
        line = read_until(proc, lambda s, t=target: s.isdigit() and int(s) >= t)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, f"round {round_}"
        reported = int(line)
        with Spool(tmp_path, 1 << 30) as spool:
            recs = list(spool)
            seqs = [check_payload(r.payload) for r in recs]  # raises on a torn record
            assert seqs == list(range(len(seqs))), "gap, duplicate or reorder"
            assert len(seqs) > reported, "an append reported as done was lost"
            assert [r.id for r in recs] == sorted(r.id for r in recs)
            assert len(spool) == len(recs)
        # The next round resumes from the last record that made it.
        reported = len(seqs) - 1


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_append_many_applies_the_bound_per_message(tmp_path: Path, policy: str) -> None:
    size = len(T) + 100
    with Spool(tmp_path, 5 * size, policy) as spool:  # type: ignore[arg-type]
        assert spool.append_many([]) == []
        flags = spool.append_many([(T, bytes([i]) * 100, 1) for i in range(7)]
                                  + [(T, b"x" * 10 * size, 1)])  # larger than the spool
        kept = [r.payload[0] for r in spool]
        if policy == "drop_oldest":
            assert flags == [True] * 7 + [False] and kept == [2, 3, 4, 5, 6]
            assert (spool.dropped_oldest, spool.dropped_newest) == (2, 1)
        else:
            assert flags == [True] * 5 + [False] * 3 and kept == [0, 1, 2, 3, 4]
            assert (spool.dropped_oldest, spool.dropped_newest) == (0, 3)
        assert len(spool) == 5 and spool.bytes == 5 * size
    with Spool(tmp_path, 5 * size, policy) as spool:  # type: ignore[arg-type]
        assert [r.payload[0] for r in spool] == kept  # committed, in order


def _corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database" * 100)


def _corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_corrupt_garbage, _corrupt_truncate])
def test_corrupt_file_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                  damage) -> None:  # type: ignore[no-untyped-def]
    with Spool(tmp_path, 1 << 24) as spool:
        for i in range(2000):
            spool.append(T, i.to_bytes(4, "little") * 50, 1)
    # Fold the WAL into the main file so truncating it really loses pages.
    for suffix in ("-wal", "-shm"):
        Path(str(tmp_path / FILE_NAME) + suffix).unlink(missing_ok=True)
    damage(tmp_path / FILE_NAME)
    with caplog.at_level(logging.ERROR, logger="agent.mqtt.spool"):
        spool = Spool(tmp_path, 1 << 24)
    with spool:
        assert len(spool) == 0 and spool.bytes == 0
        assert spool.append(T, b"fresh", 1)
        assert [r.payload for r in spool] == [b"fresh"]
    aside = list(tmp_path.glob(f"{FILE_NAME}.corrupt-*"))
    assert aside, "the damaged file should be kept for inspection"
    assert "moved it to" in caplog.text and "unreadable" in caplog.text
    # A second start is clean: no crash loop, no second move.
    with Spool(tmp_path, 1 << 24) as spool:
        assert [r.payload for r in spool] == [b"fresh"]
    assert len(list(tmp_path.glob(f"{FILE_NAME}.corrupt-*"))) == len(aside)


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Spool(tmp_path, 0)
    with pytest.raises(ValueError):
        Spool(tmp_path, 100, "drop_random")  # type: ignore[arg-type]
