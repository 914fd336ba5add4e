"""Test helpers for the MQTT tests: a collecting subscriber, waiting, child processes.

Tests wait for the event they need (a message, a SUBACK, a file, a counter), never for a
fixed time: ``eventually`` polls a cheap condition and fails saying what it waited for;
``Collector.expect`` waits on received messages; ``Collector.barrier`` and
``settle_subscriptions`` turn "nothing more arrives" and "the broker has my subscription"
into messages that can be waited on.

Run as a script it is the child process the kill tests SIGKILL:
``python tests/mqtt_helpers.py spool-writer DIR`` or ``... link-publisher ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve()
FLEET = "lab"


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return bool(pred())
        time.sleep(interval)


def eventually(pred: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.01) -> None:
    """Wait until ``pred()`` is true, or fail the test after ``timeout`` s naming ``what``.

    ``pred`` must be cheap (it runs every ``interval`` s): pass a larger ``interval`` for
    one that opens a database or reads a log, so the wait does not steal the CPU from the
    processes it waits for.
    """
    if not wait_until(lambda: bool(pred()), timeout, interval):
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def settle_subscriptions(link: Any, timeout: float = 10.0) -> None:
    """Until the broker has processed every SUBSCRIBE and UNSUBSCRIBE that ``link`` (an
    ``agent.mqtt.link.Link``) sent so far.

    A broker handles one connection's packets in order, so a probe topic subscribed *after*
    them delivers a probe back only once they were all handled; the probe is re-published
    until it comes back (one sent before its own SUBSCRIBE was handled has no subscriber).
    """
    topic = f"knet-test/settle/{uuid.uuid4().hex}"
    back = threading.Event()
    link.subscribe(topic, 1, lambda _m: back.set())
    try:
        eventually(lambda: link.publish(topic, b"probe", qos=1) and back.wait(0.05),
                   timeout, "the broker to handle the link's (un)subscriptions")
    finally:
        link.unsubscribe(topic)


def seq_payload(seq: int, size: int = 0) -> bytes:
    return struct.pack("<Q", seq) + bytes(size)


def payload_seq(payload: bytes) -> int:
    return int(struct.unpack_from("<Q", payload)[0])


def checked_payload(seq: int) -> bytes:
    """seq + a seq-dependent filler + CRC: a torn record would fail ``check_payload``."""
    body = struct.pack("<Q", seq) + bytes([seq % 251]) * (seq * 37 % 3000)
    return body + struct.pack("<I", zlib.crc32(body))


def check_payload(payload: bytes) -> int:
    body, (crc,) = payload[:-4], struct.unpack("<I", payload[-4:])
    assert zlib.crc32(body) == crc, "torn or corrupted record"
    seq = payload_seq(body)
    assert len(body) == 8 + seq * 37 % 3000
    return seq


class Collector:
    """A plain paho v5 subscriber that records (topic, payload, retain) in arrival order.

    It (re)subscribes to ``topic_filter`` (one or several) in every ``on_connect`` and
    ``start()`` returns once the SUBACK came; ``persistent`` asks the broker to keep its
    session, so QoS 1 messages published while it is away are queued for it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str | Sequence[str],
        *,
        client_id: str = "",
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        self.persistent = persistent
        self.messages: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self._tokens: dict[bytes, bool] = {}  # barrier token -> came back
        self._subacks: set[int] = set()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, *_: Any) -> None:
        with self.cond:
            self._subacks.add(mid)
            self.cond.notify_all()
        self.subscribed.set()

    def _on_disconnect(self, *_: Any) -> None:
        self.subscribed.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        with self.cond:
            if payload in self._tokens:
                self._tokens[payload] = True  # a barrier came back: not a message
            else:
                self.messages.append((msg.topic, payload, bool(msg.retain)))
            self.cond.notify_all()

    def start(self, timeout: float = 10.0) -> Collector:
        props = Properties(PacketTypes.CONNECT)
        if self.persistent:
            props.SessionExpiryInterval = 600
        self.client.connect(self.host, self.port, keepalive=10,
                            clean_start=not self.persistent, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(timeout), "subscriber did not get its SUBACK"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, pred: Callable[[list[tuple[str, bytes, bool]]], bool],
                 timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.messages), timeout)

    def expect(self, pred: Callable[[list[tuple[str, bytes, bool]]], Any], timeout: float,
               what: str) -> list[tuple[str, bytes, bool]]:
        """Wait until ``pred(messages)`` is true, or fail naming ``what`` and what came;
        returns a copy of the messages received so far."""
        with self.cond:
            if not self.cond.wait_for(lambda: bool(pred(self.messages)), timeout):
                got = [(t, p[:80]) for t, p, _r in self.messages[-5:]]
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                     f"({len(self.messages)} messages, the last: {got})")
            return list(self.messages)

    def barrier(self, topic: str, timeout: float = 10.0) -> None:
        """Until every message the broker accepted before now has been delivered here.

        ``topic`` must be one this client may read and write (its own subtree). Mosquitto
        puts a message in each subscriber's FIFO queue when it handles the PUBLISH, so once
        a token published now comes back, whatever it had accepted (PUBACKed) for us before
        has arrived: what is not here then will not come. The token is not recorded.
        """
        token = f"knet-test-barrier {uuid.uuid4().hex}".encode()
        with self.cond:
            self._tokens[token] = False
        if topic not in self.filters:
            _rc, mid = self.client.subscribe(topic, 1)
            with self.cond:
                assert self.cond.wait_for(lambda: mid in self._subacks, timeout), \
                    f"no SUBACK for the barrier topic {topic}"
        self.client.publish(topic, token, qos=1).wait_for_publish(timeout)
        with self.cond:
            assert self.cond.wait_for(lambda: self._tokens[token], timeout), \
                f"the barrier on {topic} did not come back"
        if topic not in self.filters:
            self.client.unsubscribe(topic)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self.cond:
            return [p for t, p, _r in self.messages if topic is None or t == topic]

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def spawn_helper(*args: str) -> subprocess.Popen[str]:
    """Start this file as a child process with the repo importable; stdout is a pipe."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(HELPER), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen[str], pred: Callable[[str], bool],
               timeout: float = 20.0) -> str:
    """Read the child's stdout lines until one satisfies ``pred`` (a watchdog kills a hang)."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if pred(line.strip()):
                return line.strip()
        raise AssertionError(f"child exited (rc={proc.wait()}) before the expected line")
    finally:
        timer.cancel()


# -- child process entry points -----------------------------------------------------------
def _spool_writer(directory: Path, batch: int = 1) -> None:
    """Append for ever, printing the last seq each append (batch > 1: append_many) returned."""
    from agent.mqtt.spool import Spool

    spool = Spool(directory, 1 << 30)
    seq = max((check_payload(r.payload) for r in spool), default=-1) + 1
    while True:
        if batch == 1:
            spool.append("knet/v1/lab/dev/act", checked_payload(seq), 1)
        else:
            assert all(spool.append_many([("knet/v1/lab/dev/act", checked_payload(s), 1)
                                          for s in range(seq, seq + batch)]))
        seq += batch
        print(seq - 1, flush=True)


def _link_publisher(ns: argparse.Namespace) -> None:
    from agent.mqtt.link import Link, LinkSettings
    from agent.mqtt.spool import Spool
    from agent.wire.topics import Topics

    settings = LinkSettings(host="127.0.0.1", port=ns.port, reconnect_min_delay=0.05,
                            reconnect_max_delay=0.5, keepalive=5, connect_timeout_s=2)
    topics = Topics(FLEET)
    spool = Spool(Path(ns.dir), 64 << 20)
    link = Link(settings, topics, ns.device, spool, lambda: {"agent": "test"}).start()
    print(f"session {link.session}", flush=True)
    for seq in range(ns.start, ns.start + ns.count):
        assert link.publish_reliable(topics.act(ns.device), seq_payload(seq))
    print(f"spooled {ns.count}", flush=True)
    if ns.wait_connected:
        link.wait_connected(30)
        print("connected", flush=True)
    threading.Event().wait()  # until SIGKILL


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    sw = sub.add_parser("spool-writer")
    sw.add_argument("dir", type=Path)
    sw.add_argument("--batch", type=int, default=1)
    lp = sub.add_parser("link-publisher")
    lp.add_argument("--port", type=int, required=True)
    lp.add_argument("--dir", required=True)
    lp.add_argument("--device", default="dev-a")
    lp.add_argument("--start", type=int, default=0)
    lp.add_argument("--count", type=int, default=0)
    lp.add_argument("--wait-connected", action="store_true")
    ns = parser.parse_args()
    if ns.cmd == "spool-writer":
        _spool_writer(ns.dir, ns.batch)
    else:
        _link_publisher(ns)


def state_of(payload: bytes) -> dict[str, Any]:
    return dict(json.loads(payload))


if __name__ == "__main__":
    main()
