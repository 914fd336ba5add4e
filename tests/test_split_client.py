"""agent/infer/split_client.py: the pending split requests under the four threads that change them
(encode stage, paho's network thread, publish stage, supervisor), and the reply parsing."""

from __future__ import annotations

import itertools
import json
import queue
import sys
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.infer.split_client import SplitClient, SplitCounts, parse_reply
from agent.wire.topics import Topics

TOPICS = Topics(fleet="f")


def reply(seq: int, body: object) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=TOPICS.reply("d").encode())
    msg.payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = seq.to_bytes(8, "big")
    msg.properties = props
    return msg


def test_a_request_routes_its_reply_to_the_devices_own_topic() -> None:
    results: list[bool] = []
    client = SplitClient(TOPICS, "d", timeout_s=2.5, on_result=results.append)
    topic, payload, props = client.request(7, b"envelope", label=3)
    assert (topic, payload) == (TOPICS.infer("d"), b"envelope")
    assert props.ResponseTopic == TOPICS.reply("d")
    assert int.from_bytes(props.CorrelationData, "big") == 7
    assert props.MessageExpiryInterval == 2
    client.on_reply(reply(7, {"prediction": 3}))
    client.on_reply(reply(7, {"prediction": 3}))  # a duplicate: already resolved, ignored
    client.on_reply(reply(99, {"prediction": 1}))  # never asked
    assert results == [True]
    assert client.counts() == SplitCounts(requests=1, replies=1)


def test_refusals_unsent_and_late_requests_each_end_in_their_counter() -> None:
    client = SplitClient(TOPICS, "d", timeout_s=1.0, on_result=lambda _ok: None)
    for seq in range(1, 6):
        client.request(seq, b"e", label=None)
    client.on_reply(reply(1, {"error": "no such model"}))
    client.on_reply(reply(2, b"\xff not json"))
    client.on_reply(reply(3, [1, 2]))
    _t, _p, props = client.request(6, b"e", label=None)
    client.unsent(props)
    client.unsent(props)  # once only
    assert client.expire(time.monotonic()) == 0  # not late yet
    assert client.expire(time.monotonic() + 2.0) == 2  # 4 and 5
    assert client.counts() == SplitCounts(requests=6, errors=3, offline=1, timeouts=2)
    assert client.pending == 0


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"prediction": 4}', (None, 4)),
    (b'{"error": "busy"}', ("busy", None)),
    (b"[", ("undecodable reply", None)),
    (b"[" * 10_000 + b"]" * 10_000, ("undecodable reply", None)),  # too deep: refused
    (b"3", ("the reply is not a JSON object", None)),
])
def test_parse_reply(payload: bytes, expected: tuple[object, object]) -> None:
    assert parse_reply(payload) == expected


class Hammer:
    """The four kinds of thread that change a client's pending map, each a method; any
    exception in one is kept for the test instead of vanishing with its thread."""

    def __init__(self, client: SplitClient, per_thread: int) -> None:
        self.client, self.per_thread = client, per_thread
        self.seqs = itertools.count(1)
        self.seq_lock = threading.Lock()
        self.sent: queue.Queue[tuple[int, Properties] | None] = queue.Queue()
        self.done = threading.Event()
        self.errors: list[BaseException] = []

    def thread(self, fn: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # re-raised by the test through self.errors
                self.errors.append(exc)
        return threading.Thread(target=run)

    def request(self) -> None:  # the encode stage
        for _ in range(self.per_thread):
            with self.seq_lock:
                seq = next(self.seqs)
            _t, _p, props = self.client.request(seq, b"e", label=seq % 2)
            self.sent.put((seq, props))

    def resolve(self) -> None:  # paho's network thread and the publish stage
        while (item := self.sent.get()) is not None:
            seq, props = item
            if seq % 4 == 0:
                self.client.unsent(props)
            elif seq % 4 == 1:
                self.client.on_reply(reply(seq, {"error": "busy"}))
            else:
                self.client.on_reply(reply(seq, {"prediction": 1}))

    def expire(self) -> None:  # the supervisor
        while not self.done.is_set():
            self.client.expire(time.monotonic() + 1.0)
            self.client.counts()


def test_four_threads_hammering_the_pending_map_lose_no_request() -> None:
    """Requests added, answered, refused, failed and expired at once from many threads:
    every request ends in exactly one counter, none is lost or counted twice, and
    ``expire`` never sees the map change under it."""
    results: list[bool] = []
    results_lock = threading.Lock()

    def on_result(ok: bool) -> None:
        with results_lock:
            results.append(ok)

    client = SplitClient(TOPICS, "d", timeout_s=0.0, on_result=on_result)
    h = Hammer(client, per_thread=1500)
    requesters = [h.thread(h.request) for _ in range(3)]
    resolvers = [h.thread(h.resolve) for _ in range(2)]
    expirer = h.thread(h.expire)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        for t in [*requesters, *resolvers, expirer]:
            t.start()
        for t in requesters:
            t.join()
        for _ in resolvers:
            h.sent.put(None)
        for t in resolvers:
            t.join()
        h.done.set()
        expirer.join()
    finally:
        sys.setswitchinterval(old)
    assert not h.errors, h.errors
    client.expire(time.monotonic() + 1.0)
    c = client.counts()
    total = 1500 * 3
    assert c.requests == total and c.pending == 0
    assert c.replies + c.errors + c.offline + c.timeouts == total, c
    assert len(results) == c.replies  # every answered request had a label
