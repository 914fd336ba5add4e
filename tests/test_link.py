"""The MQTT link against a real Mosquitto: order, outages, process kills, ACLs, Will/birth."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_helpers import (
    FLEET,
    Collector,
    payload_seq,
    read_until,
    seq_payload,
    settle_subscriptions,
    spawn_helper,
    state_of,
    wait_until,
)
from pydantic import SecretStr, ValidationError

from agent.mqtt.link import Link, LinkSettings, PublishOutcome, next_session
from agent.mqtt.spool import Spool
from agent.wire.topics import Topics
from broker.config import BrokerSettings
from broker.launcher import Mosquitto, free_port

TOPICS = Topics(FLEET)
DEV = "dev-a"


def settings_for(broker: Mosquitto, **kw: object) -> LinkSettings:
    base: dict[str, object] = dict(host=broker.host, port=broker.port, keepalive=5,
                                   reconnect_min_delay=0.05, reconnect_max_delay=0.5,
                                   connect_timeout_s=2)
    base.update(kw)
    return LinkSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool", 64 << 20) as s:
        yield s


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """Like the conftest broker, but its persistence works when the tests run as root."""
    settings = BrokerSettings(port=free_port(), allow_anonymous=True)
    with Mosquitto(tmp_path / "pbroker", settings) as broker:
        yield broker


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def seqs_of(col: Collector, topic: str) -> list[int]:
    return [payload_seq(p) for p in col.payloads(topic)]


def test_settings_reject_unknown_keys_and_hide_password() -> None:
    with pytest.raises(ValidationError):
        LinkSettings(hots="x")  # type: ignore[call-arg]
    s = LinkSettings(password=SecretStr("hunter2"))
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_session_counter(tmp_path: Path) -> None:
    assert [next_session(tmp_path) for _ in range(3)] == [1, 2, 3]
    (tmp_path / "session").write_text("garbage")
    assert next_session(tmp_path) > 1_000_000_000  # falls back to the clock, stays unique
    assert int((tmp_path / "session").read_text()) > 1_000_000_000


@pytest.mark.mqtt
@pytest.mark.parametrize("batch", [1, 10])
def test_in_order_exact_count_and_clean_stop(mosquitto: Mosquitto, spool: Spool,
                                              batch: int) -> None:
    n = 2000
    act = TOPICS.act(DEV)
    outcomes: list[PublishOutcome] = []
    with Collector(mosquitto.host, mosquitto.port, TOPICS.device(DEV, "#")) as col:
        link = Link(settings_for(mosquitto), TOPICS, DEV, spool, lambda: {"agent": "t"},
                    on_outcome=outcomes.append)
        with link:
            assert link.wait_connected(10)
            for seq in range(0, n, batch):
                if batch == 1:
                    assert link.publish_reliable(act, seq_payload(seq, 100))
                else:  # one spool commit per batch
                    assert all(link.publish_reliable_many(
                        [(act, seq_payload(s, 100)) for s in range(seq, seq + batch)]))
            assert col.wait_for(lambda m: sum(t == act for t, _, _ in m) >= n, 30)
            assert link.flush(10)
            assert link.healthy()
        assert seqs_of(col, act) == list(range(n))
        assert link.stats["acked"] == n and link.stats["publish_refused"] == 0
        assert link.stats["spooled"] == n and link.stats["bytes_out"] == n * 108
        assert len(spool) == 0
        assert sum(o.status == "acked" for o in outcomes) == n
        # close(): 'stopped' is the last state and no Will ('offline') was sent.
        state = TOPICS.state(DEV)
        assert col.wait_for(lambda m: any(state_of(p)["state"] == "stopped"
                                          for t, p, _ in m if t == state), 5)
        states = [state_of(p)["state"] for p in col.payloads(state)]
        assert states == ["online", "stopped"]
    with Collector(mosquitto.host, mosquitto.port, TOPICS.state(DEV)) as late:
        assert late.wait_for(lambda m: len(m) == 1, 5)
        assert state_of(late.payloads()[0]) == {**state_of(late.payloads()[0]),
                                                "state": "stopped", "session": link.session}


@pytest.mark.mqtt
def test_broker_restart_mid_stream(persistent_broker: Mosquitto, spool: Spool) -> None:
    mosquitto = persistent_broker
    n, act = 1500, TOPICS.act(DEV)
    col = Collector(mosquitto.host, mosquitto.port, act, client_id="sub-restart",
                    persistent=True).start()
    try:
        with Link(settings_for(mosquitto), TOPICS, DEV, spool, dict) as link:
            assert link.wait_connected(10)
            for seq in range(500):
                link.publish_reliable(act, seq_payload(seq))
            mosquitto.stop()  # mid-stream: part of the 500 is still in flight or spooled
            assert wait_until(lambda: not link.connected.is_set(), 5)
            for seq in range(500, 1000):
                assert link.publish_reliable(act, seq_payload(seq))  # offline: spooled
            assert len(spool) >= 500
            mosquitto.start()
            assert link.wait_connected(10)
            for seq in range(1000, n):
                link.publish_reliable(act, seq_payload(seq))
            assert col.wait_for(lambda m: len({payload_seq(p) for _, p, _ in m}) >= n, 30)
            assert link.flush(10)
            assert link.stats["reconnects"] >= 1
        seqs = seqs_of(col, act)
        firsts = list(dict.fromkeys(seqs))
        assert firsts == list(range(n)), "lost or reordered"
        duplicates = len(seqs) - len(firsts)
        # At-least-once, bounded: what the link had in flight when the broker went away, plus
        # what the broker had in flight to the subscriber (max_inflight_messages 100).
        assert duplicates <= link.settings.max_inflight + 100, duplicates
    finally:
        col.stop()


@pytest.mark.mqtt
def test_agent_sigkill_while_broker_down(mosquitto: Mosquitto, tmp_path: Path,
                                         children: list[subprocess.Popen[str]]) -> None:
    act, state_dir = TOPICS.act(DEV), str(tmp_path / "agent")
    mosquitto.stop()
    first = spawn_helper("link-publisher", "--port", str(mosquitto.port), "--dir", state_dir,
                         "--count", "300")
    children.append(first)
    read_until(first, lambda s: s == "spooled 300")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    mosquitto.start()
    with Collector(mosquitto.host, mosquitto.port, TOPICS.device(DEV, "#")) as col:
        second = spawn_helper("link-publisher", "--port", str(mosquitto.port), "--dir",
                              state_dir, "--start", "300", "--count", "100", "--wait-connected")
        children.append(second)
        assert read_until(second, lambda s: s.startswith("session")) == "session 2"
        assert col.wait_for(lambda m: len({payload_seq(p) for t, p, _ in m if t == act})
                            >= 400, 20)
        assert list(dict.fromkeys(seqs_of(col, act))) == list(range(400))


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    work = tmp_path / "aclbroker"
    work.mkdir()
    pw, acl = work / "passwd", work / "acl"
    pw.touch(mode=0o600)
    for user, secret in (("dev-a", "pa"), ("dev-b", "pb"), ("observer", "po")):
        subprocess.run(["mosquitto_passwd", "-b", str(pw), user, secret], check=True,
                       capture_output=True)
    acl.write_text("user observer\ntopic read knet/#\n\npattern readwrite knet/v1/+/%u/#\n")
    settings = BrokerSettings(port=free_port(), allow_anonymous=False,
                                      password_file=pw, acl_file=acl)
    with Mosquitto(work, settings) as broker:
        yield broker


@pytest.mark.mqtt
def test_acl_refused_publish_is_counted_not_sent(acl_broker: Mosquitto, spool: Spool) -> None:
    outcomes: list[PublishOutcome] = []
    with Collector(acl_broker.host, acl_broker.port, "knet/#", username="observer",
                   password="po") as col:
        settings = settings_for(acl_broker, password=SecretStr("pa"))
        with Link(settings, TOPICS, DEV, spool, dict, on_outcome=outcomes.append) as link:
            assert link.wait_connected(10)
            foreign, own = TOPICS.act("dev-b"), TOPICS.act(DEV)
            assert link.publish_reliable(foreign, seq_payload(0))
            assert link.publish_reliable(own, seq_payload(1))
            assert col.wait_for(lambda m: any(t == own for t, _, _ in m), 10)
            assert link.flush(5)
            assert link.stats["publish_refused"] == 1
            assert link.stats["acked"] == 1 and link.stats["sent"] == 1
            assert len(spool) == 0
            refused = [o for o in outcomes if o.status == "refused"]
            assert [o.topic for o in refused] == [foreign] and "authorized" in refused[0].reason
        assert col.payloads(foreign) == []
        assert seqs_of(col, own) == [1]


@pytest.mark.mqtt
def test_wrong_password_is_refused(acl_broker: Mosquitto, spool: Spool,
                                   caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(acl_broker, password=SecretStr("not-the-password"))
    with Link(settings, TOPICS, DEV, spool, dict) as link:
        assert wait_until(lambda: link.stats["connect_refused"] >= 1, 10)
        assert not link.connected.is_set()
        assert link.publish_reliable(TOPICS.act(DEV), b"x")  # spooled for later
    assert "not-the-password" not in caplog.text
    assert len(spool) == 1


@pytest.mark.mqtt
def test_will_on_kill_and_birth_before_online(mosquitto: Mosquitto, tmp_path: Path,
                                              children: list[subprocess.Popen[str]]) -> None:
    birth, state = TOPICS.birth(DEV), TOPICS.state(DEV)
    with Collector(mosquitto.host, mosquitto.port, TOPICS.device(DEV, "+")) as col:
        proc = spawn_helper("link-publisher", "--port", str(mosquitto.port), "--dir",
                            str(tmp_path / "agent"), "--wait-connected")
        children.append(proc)
        read_until(proc, lambda s: s == "connected")
        assert col.wait_for(lambda m: any(t == state for t, _, _ in m), 10)
        topics = [t for t, _, _ in col.messages]
        assert topics.index(birth) < topics.index(state), "birth must precede online"
        b = state_of(col.payloads(birth)[0])
        assert b["agent"] == "test" and b["session"] == 1
        assert state_of(col.payloads(state)[0])["state"] == "online"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The broker notices the dropped TCP connection at once and sends the Will.
        assert col.wait_for(lambda m: any(t == state and state_of(p)["state"] == "offline"
                                          for t, p, _ in m), 10)
    with Collector(mosquitto.host, mosquitto.port, state) as late:
        assert late.wait_for(lambda m: len(m) == 1, 5)
        _, payload, retained = late.messages[0]
        assert retained and state_of(payload) == {"state": "offline", "session": 1,
                                                  "device": DEV, "format_version": 1}


@pytest.mark.mqtt
def test_birth_and_state_republished_after_broker_restart(tmp_path: Path,
                                                          spool: Spool) -> None:
    # No persistence: retained messages die with the broker, so seeing them again proves
    # the link re-published them on reconnect.
    settings = BrokerSettings(port=free_port(), allow_anonymous=True,
                                      persistence=False)
    with Mosquitto(tmp_path / "volatile", settings) as broker:
        got = threading.Event()
        with Link(settings_for(broker), TOPICS, DEV, spool, lambda: {"v": 7}) as link:
            link.subscribe(TOPICS.infer(DEV), 1, lambda msg: got.set())
            assert link.wait_connected(10)
            broker.stop()
            assert wait_until(lambda: not link.connected.is_set(), 5)
            assert not link.publish(TOPICS.stats(DEV), b"{}")  # best effort: dropped
            assert link.stats["dropped"] == 1
            broker.start()
            assert link.wait_connected(10)
            with Collector(broker.host, broker.port, TOPICS.device(DEV, "+")) as col:
                assert col.wait_for(lambda m: {t for t, _, _ in m} >= {
                    TOPICS.birth(DEV), TOPICS.state(DEV)}, 10)
                assert state_of(col.payloads(TOPICS.birth(DEV))[0])["v"] == 7
                assert state_of(col.payloads(TOPICS.state(DEV))[0])["state"] == "online"
                # The subscription was renewed on the new broker as well.
                col.client.publish(TOPICS.infer(DEV), b"req", qos=1)
                assert got.wait(10)
            assert link.publish(TOPICS.stats(DEV), b"{}")
            assert link.stats["reconnects"] == 1


@pytest.mark.mqtt
def test_oversized_message_never_reaches_spool_or_broker(tmp_path: Path, spool: Spool) -> None:
    # Mosquitto drops a v5 client that sends more than message_size_limit; spooled, such a
    # message would be re-sent after every reconnect. The link refuses it up front.
    settings = BrokerSettings(port=free_port(), allow_anonymous=True,
                                      message_size_limit=1000)
    with Mosquitto(tmp_path / "small", settings) as broker, \
            Collector(broker.host, broker.port, TOPICS.act(DEV)) as col:
        link_settings = settings_for(broker, max_payload_bytes=1000)
        with Link(link_settings, TOPICS, DEV, spool, dict) as link:
            assert link.wait_connected(10)
            assert not link.publish_reliable(TOPICS.act(DEV), seq_payload(0, 5000))
            assert link.publish_reliable(TOPICS.act(DEV), seq_payload(1))
            assert col.wait_for(lambda m: len(m) == 1, 10)
            assert link.flush(5)
            assert link.stats["dropped"] == 1 and link.stats["reconnects"] == 0
            assert len(spool) == 0
        assert seqs_of(col, TOPICS.act(DEV)) == [1]


@pytest.mark.mqtt
def test_unsubscribe_stops_delivery_now_and_after_reconnects(mosquitto: Mosquitto,
                                                            spool: Spool) -> None:
    topics = Topics(FLEET)
    got: list[bytes] = []
    with Link(settings_for(mosquitto), topics, "dev-u", spool, dict) as link:
        assert link.wait_connected(10)
        link.subscribe("lab/probe", 1, lambda m: got.append(m.payload))
        assert wait_until(lambda: link.publish("lab/probe", b"1", qos=1) and bool(got), 5)
        link.unsubscribe("lab/probe")
        link.unsubscribe("lab/never-subscribed")  # harmless
        settle_subscriptions(link)  # the broker has the UNSUBSCRIBE
        n = len(got)
        assert link.publish("lab/probe", b"2", qos=1)
        # A message from this link to this link: "2" would arrive before a later probe.
        settle_subscriptions(link)
        assert len(got) == n
