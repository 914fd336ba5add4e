"""BatchQueue (cloud_trainer/ingest/batchqueue.py): batches by size or by age, bounded, counted."""

from __future__ import annotations

import threading
import time

import pytest

from cloud_trainer.ingest.batchqueue import BatchQueue, QueueFull


def test_a_full_batch_is_handed_out_at_once_and_in_order() -> None:
    q: BatchQueue[int] = BatchQueue(100)
    for i in range(25):
        q.put(i, timeout=1)
    # 10 are queued: no waiting for the age bound (an hour here).
    assert q.get_batch(10, wait_s=3600, timeout=1) == list(range(10))
    assert q.get_batch(10, wait_s=3600, timeout=1) == list(range(10, 20))
    assert q.qsize() == 5 and q.unfinished_tasks == 25


def test_a_partial_batch_waits_only_until_its_oldest_item_is_wait_s_old() -> None:
    q: BatchQueue[int] = BatchQueue(100)
    q.put(1, timeout=1)
    t0 = time.monotonic()
    assert q.get_batch(50, wait_s=0.2, timeout=1) == [1]
    assert time.monotonic() - t0 >= 0.15  # waited for more, then gave what it had
    # The age bound counts from the oldest item's arrival, not from the call: items left
    # over from a full batch are handed out when *they* are wait_s old.
    for i in range(15):
        q.put(i, timeout=1)
    queued_at = time.monotonic()
    time.sleep(1.5)  # they age (not a wait for an event: the bound under test is the age)
    assert q.get_batch(10, wait_s=2, timeout=1) == list(range(10))
    assert q.get_batch(10, wait_s=2, timeout=1) == list(range(10, 15))
    assert time.monotonic() - queued_at < 3.4  # a window restarted at the call: >= 3.5 s


def test_the_consumer_is_woken_by_the_item_that_completes_a_batch() -> None:
    q: BatchQueue[int] = BatchQueue(100)
    q.put(0, timeout=1)
    got: list[list[int]] = []
    taker = threading.Thread(target=lambda: got.append(q.get_batch(5, 60, timeout=1)))
    taker.start()
    for i in range(1, 5):
        q.put(i, timeout=1)
    taker.join(10)  # a wait of up to 60 s ends as the fifth item comes
    assert not taker.is_alive() and got == [[0, 1, 2, 3, 4]]


def test_empty_queue_times_out_with_nothing_and_a_full_one_refuses_puts() -> None:
    q: BatchQueue[int] = BatchQueue(3)
    assert q.get_batch(10, 0.01, timeout=0.05) == []
    for i in range(3):
        q.put(i, timeout=1)
    with pytest.raises(QueueFull):
        q.put(3, timeout=0.05)
    # A consumer taking items lets a blocked producer in.
    putter = threading.Thread(target=q.put, args=(3, 10))
    putter.start()
    assert q.get_batch(2, 0, timeout=1) == [0, 1]
    putter.join(10)
    assert not putter.is_alive() and q.get_batch(10, 0, timeout=1) == [2, 3]
    q.task_done(4)
    assert q.unfinished_tasks == 0
