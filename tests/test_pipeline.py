import threading

from mqtt_helpers import eventually

from agent.infer.pipeline import Pipeline, RunnerSlot, Stage


def test_items_flow_through_every_stage_in_order() -> None:
    out: list[int] = []
    stages = [Stage("double", lambda x: x * 2), Stage("sink", out.append)]
    p = Pipeline(range(500), stages).start()
    assert p.join(10)
    assert out == [2 * i for i in range(500)]
    assert p.finished()
    assert [s.processed for s in stages] == [500, 500]


def test_a_failing_item_is_dropped_and_counted_not_fatal() -> None:
    out: list[int] = []

    def picky(x: int) -> int:
        if x == 3:
            raise ValueError("bad input")
        return x

    stages = [Stage("picky", picky), Stage("sink", out.append)]
    p = Pipeline(range(6), stages).start()
    assert p.join(10)
    assert out == [0, 1, 2, 4, 5]
    assert stages[0].errors == 1


def test_a_slow_sink_applies_back_pressure_to_the_source() -> None:
    release = threading.Event()

    def slow(x: int) -> None:
        release.wait()

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    stages = [Stage("a", lambda x: x, queue_size=4), Stage("slow", slow, queue_size=4)]
    p = Pipeline(endless(), stages).start()
    # Saturated: both queues full, so the feeder and stage "a" are blocked on a put.
    eventually(lambda: p.depths() == {"a": 4, "slow": 4}, 10, "both queues to fill up")
    # Bounded: at most the two queues, one item in each stage and one in the feeder's hand.
    assert p.source_items <= 4 + 4 + 2 + 1
    release.set()
    p.stop(5)
    assert not any(t.is_alive() for t in p._threads)


def test_runner_slot_swap_is_seen_by_the_next_item() -> None:
    slot = RunnerSlot("v1")
    seen: list[str] = []

    def infer(x: int) -> None:
        seen.append(slot.current)
        if x == 2:
            slot.swap("v2")

    p = Pipeline(range(5), [Stage("infer", infer)]).start()
    assert p.join(10)
    assert seen == ["v1", "v1", "v1", "v2", "v2"]


def test_a_batch_stage_gets_lists_of_waiting_items_in_order() -> None:
    batches: list[list[int]] = []
    release = threading.Event()

    def sink(batch: list[int]) -> None:
        release.wait(5)  # the first call blocks, so items pile up in the sink's queue
        batches.append(batch)

    stages = [Stage("a", lambda x: x, queue_size=4), Stage("sink", sink, queue_size=8,
                                                          batch=8)]
    p = Pipeline(range(300), stages).start()
    eventually(lambda: p.depths()["sink"] == 8, 10, "a full batch waiting in the sink's queue")
    release.set()
    assert p.join(10)
    assert [x for b in batches for x in b] == list(range(300))
    assert all(1 <= len(b) <= 8 for b in batches) and len(batches[1]) == 8
    assert stages[1].processed == 300


def test_a_failing_batch_is_retried_item_by_item() -> None:
    out: list[list[int]] = []

    def picky(batch: list[int]) -> list[int]:
        if 3 in batch:
            raise ValueError("bad input")
        return [x * 10 for x in batch]

    stages = [Stage("picky", picky, queue_size=8, batch=8), Stage("sink", out.append)]
    p = Pipeline(range(8), stages).start()
    assert p.join(10)
    assert [v for got in out for v in got] == [0, 10, 20, 40, 50, 60, 70]
    assert stages[0].errors == 1 and stages[0].processed == 7


def test_an_inline_source_runs_on_the_first_stage_thread_in_order() -> None:
    out: list[int] = []
    threads: set[str] = set()

    def double(x: int) -> int:
        threads.add(threading.current_thread().name)
        if x == 7:
            raise ValueError("bad input")
        return x * 2

    stages = [Stage("double", double), Stage("sink", out.append)]
    p = Pipeline(range(300), stages, inline_source=True).start()
    assert p.join(10)
    assert out == [2 * i for i in range(300) if i != 7]
    assert threads == {"knet-source"}  # no separate inference thread, no hand-off
    assert p.finished() and p.source_items == 300
    assert [s.processed for s in stages] == [299, 299] and stages[0].errors == 1
