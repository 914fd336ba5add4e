"""One authenticated party cannot affect another's broker state.

Sessions are bound to accounts: no account can take over another's MQTT session.

Against the broker ``knet broker run`` configures (``use_username_as_clientid`` on every
listener, one username per extra connection), every account connects with every other
account's client id, with a clean and a resumed session, while the victim is online and
while it is away with a message queued. The victim is never disconnected, keeps its
session (``session_present``) and gets its queued message. Further down: the trainers'
shared-subscription group, Will messages, retained messages and blob re-requests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_broker_mqtt import tls_of

from agent.wire.topics import Topics
from broker.launcher import Mosquitto, free_port
from broker.provision import (
    Credentials,
    fleet_settings,
    layout,
    provision_device,
    provision_trainer,
)

pytestmark = pytest.mark.mqtt
LAB, YARD = Topics("lab"), Topics("yard")
# The client ids the trainer's connections used before sessions were bound to usernames.
LEGACY_TRAINER_IDS = ("knet-trainer-trainer-1", "knet-ingest-trainer-1", "knet-split-trainer-1")


@dataclass(frozen=True)
class Account:
    """One broker username and how it logs in; ``watch`` is a topic it may read, ``own`` one
    it may write."""

    username: str
    cred: Credentials
    port: int
    watch: str
    own: str
    tls: bool = False


@dataclass
class Session:
    client: mqtt.Client
    connack: int | None = None
    session_present: bool | None = None
    connected: threading.Event = threading.Event
    disconnected: threading.Event = threading.Event

    def __post_init__(self) -> None:
        self.connected, self.disconnected = threading.Event(), threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, int] = {}
        self.subacks: set[int] = set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def session(acct: Account, client_id: str, *, clean: bool, host: str = "127.0.0.1") -> Session:
    """Connect ``acct`` with ``client_id``; waits for the CONNACK (or the connection's end)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(30, 60)  # one attempt: a silent reconnect would hide a takeover
    s = Session(c)
    if acct.tls:
        c.tls_set(**tls_of(acct.cred))
    else:
        c.username_pw_set(acct.username, acct.cred.password)

    def on_connect(_c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        s.connack, s.session_present = rc.value, bool(flags.session_present)
        s.connected.set()

    def on_disconnect(*_a: Any) -> None:
        s.disconnected.set()
        s.connected.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.on_message = lambda _c, _u, m: s.messages.append((m.topic, bytes(m.payload)))
    c.on_publish = lambda _c, _u, mid, rc, _p: s.pubacks.__setitem__(mid, rc.value)
    c.on_subscribe = lambda _c, _u, mid, _r, _p: s.subacks.add(mid)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    c.connect(host, acct.port, keepalive=10, clean_start=clean, properties=props)
    c.loop_start()
    assert s.connected.wait(5), f"no CONNACK for {acct.username} as {client_id!r}"
    return s


def publish(s: Session, topic: str, payload: bytes) -> int:
    mid = s.client.publish(topic, payload, qos=1).mid
    assert wait_until(lambda: mid in s.pubacks, 5), f"no PUBACK for {topic}"
    return s.pubacks[mid]


@dataclass
class BoundFleet:
    broker: Mosquitto
    accounts: list[Account]
    trainer: Account
    feeder: Account  # dev-a: writes the stats the trainer accounts watch


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[BoundFleet]:
    d = tmp_path / "fleet"
    dev_a = provision_device(d, "dev-a", "lab")
    dev_b = provision_device(d, "dev-b", "lab", connections=["camera"])
    gate = provision_device(d, "gate-01", "yard")
    cam_c = provision_device(d, "cam-c", "lab", cert=True)
    trainer = provision_trainer(d, "trainer-1", ["lab", "yard"])
    ports = dict(port=free_port(), mtls_port=free_port())
    settings = fleet_settings(d, **ports)
    assert settings.username_as_clientid
    p, m = ports["port"], ports["mtls_port"]
    stats = LAB.all_devices("stats")
    t_state = LAB.trainer_state("trainer-1")
    accounts = [
        Account("dev-a", dev_a, p, LAB.reply("dev-a"), LAB.state("dev-a")),
        Account("dev-b", dev_b, p, LAB.reply("dev-b"), LAB.state("dev-b")),
        Account("dev-b.camera", dev_b, p, LAB.reply("dev-b"), LAB.input("dev-b")),
        Account("gate-01", gate, p, YARD.reply("gate-01"), YARD.state("gate-01")),
        Account("cam-c", cam_c, m, LAB.reply("cam-c"), LAB.state("cam-c"), tls=True),
        Account("trainer-1", trainer, p, stats, t_state),
        Account("trainer-1.ingest", trainer, p, stats, t_state),
        Account("trainer-1.split", trainer, p, stats, t_state),
        # every device has one for `knet-agent benchmark --publish` beside its daemon
        Account("dev-a.bench", dev_a, p, LAB.reply("dev-a"), LAB.state("dev-a")),
    ]
    with Mosquitto(layout(d).broker, settings) as broker:
        yield BoundFleet(broker, accounts, accounts[5], accounts[0])


def _queue_for(fleet: BoundFleet, victim: Account, payload: bytes) -> None:
    """Publish one QoS 1 message that only ``victim``'s (offline) session will hold."""
    src = fleet.feeder if victim.watch.endswith("/stats") else fleet.trainer
    s = session(src, src.username, clean=True)
    try:
        topic = LAB.stats("dev-a") if src is fleet.feeder else victim.watch
        if src is fleet.trainer:  # the trainer's own session must not be the one queued for
            assert not victim.username.startswith("trainer-1")
        assert publish(s, topic, payload) in (0, 16)
    finally:
        s.close()


def test_no_account_can_take_over_another_accounts_session(bound: BoundFleet) -> None:
    for victim in bound.accounts:
        # The victim's persistent session, subscribed, online.
        v = session(victim, victim.username, clean=True)
        assert v.connack == 0, (victim.username, v.connack)
        _rc, mid = v.client.subscribe(victim.watch, qos=1)
        assert wait_until(lambda v=v, mid=mid: mid in v.subacks, 5)
        ids = [victim.username, *(LEGACY_TRAINER_IDS if victim.username.startswith(
            "trainer-1") else ())]
        attackers = [a for a in bound.accounts if a.username != victim.username]
        for attacker in attackers:
            for cid in ids:
                for clean in (True, False):
                    s = session(attacker, cid, clean=clean)
                    # Confined: accepted under its own name (or refused), never the victim's.
                    assert s.connack in (0, 135), (attacker.username, cid, s.connack)
                    s.close()
        # Still the same connection: an accepted PUBACK on it, and no disconnect was seen.
        assert publish(v, victim.own, b"alive") in (0, 16)
        assert not v.disconnected.is_set(), f"{victim.username} was disconnected"
        v.close()

        # Away with a queued message: the attacks again, clean and resumed.
        _queue_for(bound, victim, f"for {victim.username}".encode())
        for attacker in attackers:
            for cid in ids:
                for clean in (False, True):
                    s = session(attacker, cid, clean=clean)
                    s.close()
        back = session(victim, victim.username, clean=False)
        try:
            assert back.connack == 0 and back.session_present, victim.username
            assert wait_until(lambda b=back, vv=victim: (
                any(p == f"for {vv.username}".encode() for _t, p in b.messages)), 5), \
                f"{victim.username} lost its queued message"
        finally:
            back.close()


def test_without_the_binding_a_device_takes_over_a_trainer_session(tmp_path: Path) -> None:
    """The hole this guards against, on the same fleet without ``use_username_as_clientid``."""
    d = tmp_path / "fleet"
    dev = provision_device(d, "dev-a", "lab")
    trainer = provision_trainer(d, "trainer-1", ["lab"])
    settings = fleet_settings(d, free_port()).model_copy(update={"username_as_clientid": False})
    stats = LAB.all_devices("stats")
    t = Account("trainer-1", trainer, settings.port, stats, LAB.trainer_state("trainer-1"))
    a = Account("dev-a", dev, settings.port, LAB.reply("dev-a"), LAB.state("dev-a"))
    with Mosquitto(layout(d).broker, settings):
        victim = session(t, "knet-ingest-trainer-1", clean=True)
        thief = session(a, "knet-ingest-trainer-1", clean=False)
        try:
            assert thief.connack == 0 and thief.session_present  # the trainer's session
            assert victim.disconnected.wait(5)
        finally:
            thief.close()
            victim.close()


# -- other ways one party could affect another's state ------------------------------------
def test_a_device_cannot_take_activations_out_of_the_trainers_share_group(
        bound: BoundFleet, tmp_path: Path) -> None:
    """Mosquitto grants any subscription and checks ``read`` on delivery, so a device in the
    trainers' group would be handed every other activation and refused it: lost (measured
    on 2.0.11: 5 of 10 reached the trainer). The trainer joins a group named with an HMAC
    under its signing key; the device cannot name it and the trainer gets everything."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings
    from cloud_trainer.ingest.store import SQLiteSampleStore
    from cloud_trainer.release.keys import secret_share_group
    from tests.test_ingest import envelope

    key = Ed25519PrivateKey.generate()
    group = secret_share_group("trainers", key)
    assert group == secret_share_group("trainers", key) != secret_share_group(
        "trainers", Ed25519PrivateKey.generate())
    trainer = bound.trainer
    thief = next(a for a in bound.accounts if a.username == "dev-b")
    t = session(thief, "thief", clean=True)
    for name in ("trainers", group.rsplit("-", 1)[0], "trainers-0"):
        _rc, mid = t.client.subscribe(f"$share/{name}/{LAB.all_devices('act')}", qos=1)
        assert wait_until(lambda mid=mid: mid in t.subacks, 5)
    store = SQLiteSampleStore(tmp_path / "store")
    settings = IngestSettings(port=trainer.port, username="trainer-1.ingest",
                              password=trainer.cred.password, client_id="ingest",
                              share_group=group, log_interval_s=60)
    with Ingestor(settings, LAB, store) as ing:
        feeder = session(bound.feeder, "feeder", clean=True)
        try:
            for i in range(20):
                assert publish(feeder, LAB.act("dev-a"), envelope("dev-a", i)) in (0, 16)
            assert wait_until(lambda: ing.stats.stored == 20, 10), ing.metrics()
        finally:
            feeder.close()
    assert t.messages == []
    t.close()
    store.close()


def test_a_will_on_a_topic_outside_the_acl_is_never_delivered(bound: BoundFleet) -> None:
    """A Will is checked against the ACL when the broker sends it: a device's Will on the
    manifest, another device's state or a trainer's state is dropped; on its own state it
    arrives (which also marks when the earlier ones would have)."""
    import socket

    watcher = session(bound.trainer, "watcher", clean=True)
    _rc, mid = watcher.client.subscribe("knet/#", qos=1)
    assert wait_until(lambda: mid in watcher.subacks, 5)
    dev = bound.feeder  # dev-a
    forbidden = [LAB.manifest, LAB.state("dev-b"), LAB.trainer_state("trainer-1"),
                 LAB.reply("dev-b"), LAB.input("dev-b")]
    for i, topic in enumerate([*forbidden, LAB.state("dev-a")]):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"w{i}", protocol=mqtt.MQTTv5)
        c.username_pw_set(dev.username, dev.cred.password)
        c.will_set(topic, f"will {i}".encode(), qos=1, retain=True)
        c.connect("127.0.0.1", dev.port)
        assert wait_until(lambda c=c: c.loop(0.1) == 0 and c.is_connected(), 5)  # CONNACK
        sock = c.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # an abnormal end: the broker sends the Will
        sock.close()
    assert wait_until(lambda: any(t == LAB.state("dev-a") for t, _p in watcher.messages), 10)
    got = {t for t, _p in watcher.messages}
    assert got.isdisjoint(forbidden), got
    watcher.close()


def test_retained_messages_and_blob_requests_outside_the_acl_are_refused(
        bound: BoundFleet) -> None:
    """A device can neither leave a retained message on another party's topic (manifest,
    another device's state/birth/input, a trainer's state) nor re-request chunks in another
    device's name; the trainer's split replies go only to the requester (test_split.py)."""
    dev = session(bound.feeder, "dev-a-x", clean=True)
    try:
        for topic in (LAB.manifest, LAB.state("dev-b"), LAB.birth("dev-b"), LAB.input("dev-b"),
                      LAB.trainer_state("trainer-1"), LAB.blob_request("dev-b"),
                      LAB.reply("dev-b"), YARD.state("dev-a")):
            mid = dev.client.publish(topic, b"{}", qos=1, retain=True).mid
            assert wait_until(lambda mid=mid: mid in dev.pubacks, 5), topic
            assert dev.pubacks[mid] == 135, topic
        assert publish(dev, LAB.blob_request("dev-a"), b"{}") in (0, 16)
    finally:
        dev.close()
