"""The locked-down broker against a real Mosquitto 2.0.11: auth, ACL, reload, persistence, TLS.

Every broker is a private child on free loopback ports, built from a provisioned fleet
directory exactly as ``knet broker run`` builds it.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import wait_until
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.client import KnetClient, make_client
from agent.mqtt.endpoint import MqttEndpoint
from agent.wire.topics import Topics
from broker import certs as pki
from broker.launcher import Mosquitto, free_port, wait_for_port
from broker.provision import (
    Credentials,
    create_certs,
    fleet_settings,
    layout,
    provision_device,
    provision_trainer,
    revoke_device,
)

pytestmark = pytest.mark.mqtt

REPO = Path(__file__).resolve().parent.parent
LAB, YARD = Topics("lab"), Topics("yard")
NOT_AUTHORIZED = 135
# PUBACK success: 0, or 16 "No matching subscribers" (Mosquitto says so under MQTT v5).
ACCEPTED = (0, 16)


@dataclass
class Client:
    """A paho v5 client that records CONNACK, PUBACK/SUBACK reason codes and messages."""

    client: mqtt.Client
    connack: int | None = None
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    pubacks: dict[int, int] = field(default_factory=dict)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                timeout: float = 5.0) -> int:
        """QoS 1 publish; returns the PUBACK reason code."""
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        assert wait_until(lambda: mid in self.pubacks, timeout), f"no PUBACK for {topic}"
        return self.pubacks[mid]

    def subscribe(self, topic_filter: str, timeout: float = 5.0) -> list[int]:
        _rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert wait_until(lambda: mid in self.subacks, timeout), f"no SUBACK for {topic_filter}"
        return self.subacks[mid]

    def barrier(self, topic: str, timeout: float = 5.0) -> None:
        """Until everything the broker had for this client has arrived ("nothing arrives"
        without watching a clock): Mosquitto queues a message for each subscriber when it
        handles the PUBLISH, retained ones when it handles the SUBSCRIBE, in order; so a
        token published now on ``topic`` (this client's to read and write, and covered by
        none of its subscriptions) comes back after them. The token is not recorded."""
        token = f"barrier {uuid.uuid4().hex}".encode()
        assert self.subscribe(topic, timeout) == [1], f"barrier topic {topic} refused"
        assert self.publish(topic, token, timeout=timeout) == 0
        assert wait_until(lambda: any(p == token for _t, p, _r in list(self.messages)),
                          timeout), f"the barrier on {topic} did not come back"
        self.messages[:] = [m for m in self.messages if m[1] != token]
        self.client.unsubscribe(topic)

    def topics(self) -> list[str]:
        return [t for t, _p, _r in list(self.messages)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(broker: Mosquitto, username: str | None, password: str | None = None, *,
            port: int | None = None, tls: dict[str, Any] | None = None,
            timeout: float = 5.0) -> Client:
    """Connect and wait for the CONNACK or the connection's end (``.connack`` stays None
    if no CONNACK came)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(30, 60)  # one attempt per test: a retry would blur what happened
    rec = Client(c)
    if username is not None:
        c.username_pw_set(username, password)
    if tls is not None:
        c.tls_set(**tls)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        rec.connack = rc.value
        rec.connected.set()

    def on_disconnect(*_a: Any) -> None:
        rec.disconnected.set()
        rec.connected.set()  # an answer too: wait no longer

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.on_publish = lambda _c, _u, mid, rc, _p: rec.pubacks.__setitem__(mid, rc.value)
    c.on_subscribe = lambda _c, _u, mid, rcs, _p: rec.subacks.__setitem__(
        mid, [r.value for r in rcs])
    c.on_message = lambda _c, _u, m: rec.messages.append((m.topic, bytes(m.payload),
                                                          bool(m.retain)))
    c.connect(broker.host, port or broker.port, keepalive=10)
    c.loop_start()
    rec.connected.wait(timeout)
    return rec


def connect_ok(broker: Mosquitto, cred: Credentials, **kw: Any) -> Client:
    c = connect(broker, cred.username, cred.password, **kw)
    assert c.connack == 0, f"{cred.username} refused: {c.connack}"
    return c


def tls_of(cred: Credentials) -> dict[str, Any]:
    return {"ca_certs": str(cred.ca_file),
            "certfile": str(cred.cert_file) if cred.cert_file else None,
            "keyfile": str(cred.key_file) if cred.key_file else None}


@dataclass
class Fleet:
    dir: Path
    broker: Mosquitto
    dev_a: Credentials
    dev_b: Credentials
    gate: Credentials  # fleet yard
    cam_c: Credentials  # client certificate
    trainer: Credentials
    tls_port: int
    mtls_port: int


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    d = tmp_path / "fleet"
    creds = dict(
        dev_a=provision_device(d, "dev-a", "lab"),
        dev_b=provision_device(d, "dev-b", "lab"),
        gate=provision_device(d, "gate-01", "yard"),
        cam_c=provision_device(d, "cam-c", "lab", cert=True),
        trainer=provision_trainer(d, "trainer-1", ["lab"], tls=True),
    )
    ports = dict(port=free_port(), tls_port=free_port(), mtls_port=free_port())
    settings = fleet_settings(d, **ports)
    with Mosquitto(layout(d).broker, settings) as broker:
        yield Fleet(d, broker, tls_port=ports["tls_port"], mtls_port=ports["mtls_port"],
                    **creds)


def test_wrong_password_and_unknown_accounts_get_connack_135(fleet: Fleet) -> None:
    b = fleet.broker
    # Mosquitto 2.0.11 answers all of these with 135 Not authorized (never 134 Bad user
    # name or password): a caller cannot tell an unknown id from a wrong password.
    for user, password in (("dev-a", "wrong"), ("nobody", "x"), ("dev-a", None),
                           (None, None), ("cam-c", "x")):
        c = connect(b, user, password)
        try:
            assert c.connack == NOT_AUTHORIZED, (user, password, c.connack)
        finally:
            c.close()
    connect_ok(b, fleet.dev_a).close()


def test_device_confined_to_its_subtree(fleet: Fleet) -> None:
    b = fleet.broker
    trainer = connect_ok(b, fleet.trainer)
    b_dev = connect_ok(b, fleet.dev_b)
    a = connect_ok(b, fleet.dev_a)
    try:
        assert trainer.subscribe(LAB.all_devices("act")) == [1]
        assert trainer.subscribe(f"{LAB.fleet_root}/model/#") == [1]
        assert b_dev.subscribe(f"{LAB.fleet_root}/dev-b/#") == [1]
        # Foreign subtree, the model topics, another fleet: PUBACK 135, nothing delivered.
        for topic in (LAB.act("dev-b"), LAB.input("dev-b"), LAB.manifest,
                      LAB.blob("0" * 64, 0), YARD.act("dev-a"), "knet/v1/trainer/x/state"):
            assert a.publish(topic, b"forged") == NOT_AUTHORIZED, topic
        assert a.publish(LAB.act("dev-a"), b"own") in ACCEPTED
        # The forged messages were answered before "own" was published: had the trainer
        # been sent one, it would have come first. b gets nothing of a's: its barrier says
        # when that is known.
        assert wait_until(lambda: LAB.act("dev-a") in trainer.topics(), 5)
        b_dev.barrier(LAB.device("dev-b", "barrier"))
        assert trainer.topics() == [LAB.act("dev-a")]
        assert b_dev.messages == []
    finally:
        for c in (a, b_dev, trainer):
            c.close()


def test_device_cannot_read_other_devices(fleet: Fleet) -> None:
    b = fleet.broker
    a = connect_ok(b, fleet.dev_a)
    b_dev = connect_ok(b, fleet.dev_b)
    trainer = connect_ok(b, fleet.trainer)
    try:
        # Mosquitto 2.0.11 grants these subscriptions (SUBACK QoS 1, not 135) and checks
        # read access per message on delivery: so the proof is that nothing arrives.
        for flt in (f"{LAB.fleet_root}/dev-b/#", LAB.act("dev-b"), LAB.all_devices("act"),
                    "#", f"$share/g/{LAB.fleet_root}/+/act"):
            assert a.subscribe(flt) == [1], flt
        assert b_dev.publish(LAB.act("dev-b"), b"b's") in ACCEPTED
        assert b_dev.publish(LAB.reply("dev-b"), b"b's") in ACCEPTED
        assert trainer.publish(LAB.reply("dev-b"), b"for b") in ACCEPTED
        assert trainer.publish(LAB.manifest, b"{}", retain=True) in ACCEPTED
        # The manifest was published last, after every other message had been answered:
        # anything of b's that a were sent would have come before it.
        assert wait_until(lambda: LAB.manifest in a.topics(), 5)
        assert set(a.topics()) == {LAB.manifest}  # the fleet's model topics are readable
    finally:
        for c in (a, b_dev, trainer):
            c.close()


def test_device_reads_manifest_and_blobs_of_its_own_fleet_only(fleet: Fleet) -> None:
    b = fleet.broker
    trainer = connect_ok(b, fleet.trainer)
    try:
        assert trainer.publish(LAB.manifest, b'{"v": 1}', retain=True) in ACCEPTED
        assert trainer.publish(YARD.manifest, b'{"v": 9}', retain=True) == NOT_AUTHORIZED
        # The trainer serves lab only; its replies, state and model topics are its to write.
        assert trainer.publish(LAB.reply("dev-a"), b"{}") in ACCEPTED
        own_state = LAB.trainer_state("trainer-1")
        assert trainer.publish(own_state, b"online", retain=True) in ACCEPTED
        assert trainer.publish("knet/v1/trainer/other/state", b"x") == NOT_AUTHORIZED
        assert trainer.publish(LAB.act("dev-a"), b"forged") == NOT_AUTHORIZED
        a = connect_ok(b, fleet.dev_a)
        try:
            assert a.subscribe(f"{LAB.fleet_root}/model/#") == [1]
            assert wait_until(lambda: a.messages, 5)
            assert a.messages[0] == (LAB.manifest, b'{"v": 1}', True)
            assert trainer.publish(LAB.blob("ab" * 32, 0), b"chunk") in ACCEPTED
            assert wait_until(lambda: len(a.messages) == 2, 5)
            assert a.messages[1][0] == LAB.blob("ab" * 32, 0)
        finally:
            a.close()
        gate = connect_ok(b, fleet.gate)  # fleet yard: lab's manifest is not for it
        try:
            assert gate.subscribe(f"{LAB.fleet_root}/model/#") == [1]
            gate.barrier(YARD.device("gate-01", "barrier"))  # after any retained message
            assert gate.messages == []
        finally:
            gate.close()
    finally:
        trainer.close()


def test_trainer_shared_subscription_under_the_acl(fleet: Fleet) -> None:
    b = fleet.broker
    # The ACL has no $share lines: Mosquitto checks the filter without "$share/<group>/".
    # Each connection logs in under its own username (the broker binds a session to it):
    # two connections of the trainer account, as two replicas would be.
    replicas = [connect_ok(b, fleet.trainer),
                connect(b, "trainer-1.ingest", fleet.trainer.password)]
    assert replicas[1].connack == 0
    a = connect_ok(b, fleet.dev_a)
    try:
        for r in replicas:
            assert r.subscribe(LAB.shared("trainers", LAB.all_devices("act"))) == [1]
            assert r.subscribe(LAB.shared("trainers", LAB.all_devices("state"))) == [1]
        for i in range(20):
            assert a.publish(LAB.act("dev-a"), bytes([i])) in ACCEPTED
        assert a.publish(LAB.state("dev-a"), b"online") in ACCEPTED
        got = lambda: [p for r in replicas for t, p, _ in r.messages if t == LAB.act("dev-a")]  # noqa: E731
        assert wait_until(lambda: len(got()) == 20, 5)
        assert sorted(got()) == [bytes([i]) for i in range(20)]  # each exactly once
        assert all(r.messages for r in replicas)  # split between the replicas
        assert wait_until(lambda: any(LAB.state("dev-a") in r.topics() for r in replicas), 5)
    finally:
        for c in (a, *replicas):
            c.close()


def test_revoke_and_reload_refuses_the_device(fleet: Fleet) -> None:
    b = fleet.broker
    a = connect_ok(b, fleet.dev_a)
    try:
        assert revoke_device(fleet.dir, "dev-a", reload=False)
        # Before the reload the broker still has the old files in memory.
        probe = connect(b, "dev-a", fleet.dev_a.password)
        assert probe.connack == 0
        probe.close()
        b.reload()
        # The reload re-checks connected clients: the revoked one is disconnected ...
        assert a.disconnected.wait(5)
        # ... and cannot come back; the others are untouched.
        again = connect(b, "dev-a", fleet.dev_a.password)
        assert again.connack == NOT_AUTHORIZED
        again.close()
        connect_ok(b, fleet.dev_b).close()
    finally:
        a.close()


def test_retained_manifest_and_state_survive_restart(fleet: Fleet) -> None:
    b = fleet.broker
    trainer = connect_ok(b, fleet.trainer)
    a = connect_ok(b, fleet.dev_a)
    assert trainer.publish(LAB.manifest, b'{"version": 3}', retain=True) in ACCEPTED
    assert a.publish(LAB.state("dev-a"), b'{"state": "online"}', retain=True) in ACCEPTED
    a.close()
    trainer.close()
    b.restart()
    trainer = connect_ok(b, fleet.trainer)
    a = connect_ok(b, fleet.dev_a)
    try:
        assert a.subscribe(LAB.manifest) == [1]
        assert trainer.subscribe(LAB.all_devices("state")) == [1]
        assert wait_until(lambda: a.messages and trainer.messages, 5)
        assert a.messages == [(LAB.manifest, b'{"version": 3}', True)]
        assert trainer.messages == [(LAB.state("dev-a"), b'{"state": "online"}', True)]
    finally:
        a.close()
        trainer.close()


def test_offline_trainer_session_queues_beyond_mosquittos_default(fleet: Fleet) -> None:
    # Mosquitto's default max_queued_messages (1000) silently dropped QoS 1 messages for an
    # absent subscriber while the publisher got PUBACKs; the fleet config queues them all.
    b, n = fleet.broker, 3000

    def trainer_session() -> KnetClient:
        return make_client(MqttEndpoint(
            host=b.host, port=b.port, username="trainer-1",
            password=fleet.trainer.password, client_id="trainer-1-ingest",
            clean_start=False, session_expiry=600))

    t = trainer_session().start()
    assert t.wait_connected(5)
    assert t.subscribe_and_wait(LAB.all_devices("act"), 5) == [1]
    t.stop()
    a = connect_ok(b, fleet.dev_a)
    try:
        infos = [a.client.publish(LAB.act("dev-a"), i.to_bytes(4, "big"), qos=1)
                 for i in range(n)]
        assert wait_until(lambda: len(a.pubacks) == n, 20)
        assert set(a.pubacks.values()) == {0}
        assert all(i.rc == 0 for i in infos)
    finally:
        a.close()
    got: list[int] = []
    t = trainer_session()
    t.on_message = lambda _c, _u, m: got.append(int.from_bytes(m.payload, "big"))
    t.start()
    try:
        assert wait_until(lambda: len(got) >= n, 20), len(got)
        assert sorted(set(got)) == list(range(n))
    finally:
        t.stop()


def test_tls_listener_trusting_the_fleet_ca(fleet: Fleet, tmp_path: Path) -> None:
    b = fleet.broker
    t = connect(b, "trainer-1", fleet.trainer.password, port=fleet.tls_port,
                tls=tls_of(fleet.trainer))
    assert t.connack == 0
    assert t.publish(LAB.manifest, b"{}") in ACCEPTED
    t.close()
    # A password is still checked over TLS.
    bad = connect(b, "trainer-1", "wrong", port=fleet.tls_port, tls=tls_of(fleet.trainer))
    assert bad.connack == NOT_AUTHORIZED
    bad.close()
    # A client that trusts another CA refuses the broker's certificate.
    other = pki.create_ca(tmp_path / "other-ca")
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(b, "trainer-1", fleet.trainer.password, port=fleet.tls_port,
                tls={"ca_certs": str(other.cert)})


def test_client_certificate_is_the_username(fleet: Fleet, tmp_path: Path) -> None:
    b = fleet.broker
    trainer = connect_ok(b, fleet.trainer)
    # No username sent, or a false one: the certificate's CN (cam-c) decides.
    c = connect(b, "dev-a", None, port=fleet.mtls_port, tls=tls_of(fleet.cam_c))
    try:
        assert c.connack == 0
        assert trainer.subscribe(LAB.all_devices("act")) == [1]
        assert c.publish(LAB.act("dev-a"), b"forged") == NOT_AUTHORIZED
        assert c.publish(LAB.act("cam-c"), b"own") in ACCEPTED
        assert wait_until(lambda: trainer.topics() == [LAB.act("cam-c")], 5)
    finally:
        c.close()
        trainer.close()
    # Refused in the TLS handshake: without a certificate, with one from another CA, with
    # the broker's own server certificate (its EKU says serverAuth, not clientAuth).
    other = tmp_path / "other"
    pki.create_ca(other)
    rogue = pki.create_client_cert(other, "cam-c", other / "rogue")
    ca = str(fleet.cam_c.ca_file)
    certs = layout(fleet.dir).certs
    for tls in ({"ca_certs": ca},
                {"ca_certs": ca, "certfile": str(rogue.cert), "keyfile": str(rogue.key)},
                {"ca_certs": ca, "certfile": str(certs / "server.crt"),
                 "keyfile": str(certs / "server.key")}):
        assert_handshake_refused(b, fleet.mtls_port, tls)
    assert "peer did not return a certificate" in b.log_text()


def assert_handshake_refused(broker: Mosquitto, port: int, tls: dict[str, Any]) -> None:
    """Under TLS 1.3 the client finishes its side of the handshake before the broker
    checks the certificate, so paho sees a closed connection and no CONNACK."""
    try:
        c = connect(broker, None, port=port, tls=tls, timeout=3)
    except (ssl.SSLError, OSError):
        return
    c.close()
    assert c.connack is None and c.disconnected.is_set(), tls


def test_revoked_certificate_loses_acl_and_handshake(fleet: Fleet) -> None:
    b = fleet.broker
    c = connect(b, None, port=fleet.mtls_port, tls=tls_of(fleet.cam_c))
    assert c.connack == 0
    tls = tls_of(fleet.cam_c)
    # Keep copies: revoking deletes the bundle.
    kept = {k: Path(v).read_bytes() for k, v in tls.items() if v}
    for k, data in kept.items():
        (fleet.dir / f"kept-{k}").write_bytes(data)
    tls = {k: str(fleet.dir / f"kept-{k}") for k in kept}
    try:
        assert revoke_device(fleet.dir, "cam-c", reload=False)
        b.reload()
        # Unlike a password client, the connected certificate client is not dropped (its
        # certificate still verifies), but the reloaded ACL leaves it nothing.
        assert c.publish(LAB.act("cam-c"), b"x") == NOT_AUTHORIZED
        assert not c.disconnected.is_set()
    finally:
        c.close()
    # The reload re-read the CRL too (observed with 2.0.11): a new handshake fails.
    assert_handshake_refused(b, fleet.mtls_port, tls)
    assert "certificate verify failed" in b.log_text()


def test_run_foreground_reloads_on_provisioning_and_stops_on_sigterm(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    provision_device(d, "dev-a", "lab")
    create_certs(d)
    port, tls_port = free_port(), free_port()
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO);"
            "from broker.provision import run_foreground;"
            f"sys.exit(run_foreground({str(d)!r}, {port}, tls_port={tls_port}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pid_file = layout(d).pid_file
        assert wait_until(pid_file.exists, 10) and wait_for_port("127.0.0.1", port, 5)
        assert wait_for_port("127.0.0.1", tls_port, 5)
        mosq_pid = int(pid_file.read_text())
        broker = Mosquitto(layout(d).broker, fleet_settings(d, port))  # for host/port only
        # Provisioning signals the running broker: the new device gets in at once.
        late = provision_device(d, "dev-late", "lab")
        c = connect(broker, "dev-late", late.password)
        assert c.connack == 0
        c.close()
        # SIGHUP to the runner is passed on to the broker as a reload.
        reloads = broker.log_text().count("Reloading config.")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: broker.log_text().count("Reloading config.") > reloads, 5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not Path(f"/proc/{mosq_pid}").exists()  # stopped by its PID and reaped
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
