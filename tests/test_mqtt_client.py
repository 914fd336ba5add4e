"""The one client factory (agent/mqtt/client.py) against real Mosquitto brokers: the endpoint's
settings reach the broker, TLS works with the fleet's CA and client certificates, and a
subscription can be waited on until its SUBACK, refused ones raising by name."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_helpers import wait_until
from pydantic import Field, SecretStr

from agent.mqtt.client import (
    KnetClient,
    SubscribeError,
    SubscribeTimeout,
    SubscriptionRefused,
    Will,
    make_client,
)
from agent.mqtt.endpoint import MqttEndpoint, TlsSettings
from broker import certs as pki
from broker.config import BrokerSettings
from broker.launcher import Mosquitto, free_port
from broker.provision import fleet_settings, layout, provision_device

pytestmark = pytest.mark.mqtt
DYNSEC_PLUGINS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                  "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                  "/usr/lib/mosquitto_dynamic_security.so",
                  "/usr/local/lib/mosquitto_dynamic_security.so")


def endpoint(broker: Mosquitto, **kw: Any) -> MqttEndpoint:
    return MqttEndpoint(host=broker.host, port=broker.port, **kw)


def connected_line(broker: Mosquitto, client_id: str) -> str:
    """Mosquitto's ``New client connected ... as <id> (p5, c1, k30, u'user')`` line."""
    found: list[str] = []

    def seen() -> bool:
        found[:] = [ln for ln in broker.log_text().splitlines()
                    if f" as {client_id} (" in ln and "New client connected" in ln]
        return bool(found)

    assert wait_until(seen, 5), broker.log_text()[-1000:]
    return found[-1]


def test_endpoint_settings_reach_the_broker(mosquitto: Mosquitto) -> None:
    ep = endpoint(mosquitto, client_id="probe-1", keepalive=7, connect_timeout_s=3,
                  clean_start=False, session_expiry=60)
    c = make_client(ep).start()
    try:
        assert c.wait_connected(10)
        assert c.connect_timeout == 3
        assert re.search(r"\(p5, c0, k7\b", connected_line(mosquitto, "probe-1"))
        assert c.subscribe_and_wait("lab/queued", 5) == [1]
    finally:
        c.stop()
    # The session outlives the connection: a QoS 1 message sent meanwhile is queued for it.
    pub = make_client(endpoint(mosquitto)).start()
    try:
        assert pub.wait_connected(10)
        pub.publish("lab/queued", b"while away", qos=1).wait_for_publish(5)
    finally:
        pub.stop()
    got: list[bytes] = []
    again = make_client(ep)
    again.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    again.start()
    try:
        assert wait_until(lambda: got == [b"while away"], 10), got
    finally:
        again.stop()


def test_reconnect_back_off_follows_the_endpoint() -> None:
    port = free_port()  # nothing listens: every attempt fails at once

    def attempts(delay: float, seconds: float = 1.5) -> int:
        c = make_client(MqttEndpoint(port=port, reconnect_min_delay=delay,
                                     reconnect_max_delay=delay))
        count = [0]

        def on_fail(*_: Any) -> None:
            count[0] += 1

        c.on_connect_fail = on_fail
        c.start()
        try:
            threading.Event().wait(seconds)
            return count[0]
        finally:
            c.stop()

    assert attempts(0.05) >= 4
    assert attempts(30.0) <= 2


def test_will_is_the_callers(mosquitto: Mosquitto) -> None:
    watcher = make_client(endpoint(mosquitto))
    got: list[bytes] = []
    watcher.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    watcher.start()
    c = make_client(endpoint(mosquitto, keepalive=5), will=Will("lab/will", b"gone", retain=False))
    try:
        assert watcher.wait_connected(10) and watcher.subscribe_and_wait("lab/will", 5)
        c.start()
        assert c.wait_connected(10)
        c.loop_stop()  # vanish without a DISCONNECT: the broker publishes the Will
        c.socket().close()  # type: ignore[union-attr]
        assert wait_until(lambda: got == [b"gone"], 15), got
    finally:
        watcher.stop()


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A provisioned fleet broker: a password device over TLS, a certificate device with an
    extra ``camera`` connection on the client-certificate listener."""
    d = tmp_path_factory.mktemp("fleet")
    creds = {"dev": provision_device(d, "dev-a", "lab", tls=True),
             "cam": provision_device(d, "cam-c", "lab", cert=True, connections=["camera"])}
    ports = dict(port=free_port(), tls_port=free_port(), mtls_port=free_port())
    with Mosquitto(layout(d).broker, fleet_settings(d, **ports)) as broker:
        yield {"broker": broker, "dir": d, **creds, **ports}


def test_tls_with_the_fleet_ca_and_a_foreign_ca(tls_fleet: dict[str, Any],
                                               tmp_path: Path) -> None:
    dev = tls_fleet["dev"]
    ep = MqttEndpoint(port=tls_fleet["tls_port"], username="dev-a",
                      password=SecretStr(dev.password), tls=TlsSettings(ca_file=dev.ca_file))
    c = make_client(ep).start()
    try:
        assert c.wait_connected(10)
    finally:
        c.stop()
    other = pki.create_ca(tmp_path / "other-ca")
    rogue = make_client(ep.model_copy(update={"tls": TlsSettings(ca_file=other.cert)}))
    failures = threading.Event()
    rogue.on_connect_fail = lambda *_: failures.set()
    rogue.start()
    try:
        assert failures.wait(10) and not rogue.connected.is_set()
    finally:
        rogue.stop()


def test_client_certificates_of_the_account_and_its_extra_connection(
        tls_fleet: dict[str, Any]) -> None:
    cam, broker = tls_fleet["cam"], tls_fleet["broker"]
    ep = MqttEndpoint(port=tls_fleet["mtls_port"], username="cam-c",
                      tls=TlsSettings(ca_file=cam.ca_file, cert_file=cam.cert_file,
                                      key_file=cam.key_file))
    camera = ep.for_connection("camera")
    assert camera.username == "cam-c.camera" and camera.tls is not None
    assert camera.tls.cert_file == cam.cert_file.parent / "camera" / cam.cert_file.name
    for e, user in ((ep, "cam-c"), (camera, "cam-c.camera")):
        c = make_client(e, default_client_id=user).start()
        try:
            assert c.wait_connected(10), user
            assert f"u'{user}')" in connected_line(broker, user)
        finally:
            c.stop()


def _dynsec_client(user: str, password: str, acls: list[dict[str, Any]]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dynamic-security client entry (PBKDF2-SHA512, as mosquitto_ctrl writes it)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    client = {"username": user, "password": base64.b64encode(digest).decode(),
              "salt": base64.b64encode(salt).decode(), "iterations": 101,
              "roles": [{"rolename": user}]}
    return client, {"rolename": user, "acls": acls}


class _PluginSettings(BrokerSettings):
    """knet's broker settings plus the lines that load a plugin (this test only)."""

    plugin_lines: list[str] = Field(default_factory=list)

    def render(self) -> str:
        return super().render() + "\n".join(self.plugin_lines) + "\n"


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto with its dynamic-security plugin, which (unlike the ACL file of 2.0.11,
    checked only on delivery) refuses a subscription outside the account's ACL in SUBACK."""
    plugin = next((p for p in DYNSEC_PLUGINS if Path(p).is_file()), None)
    if plugin is None:
        pytest.skip("Mosquitto's dynamic-security plugin is not installed")
    client, role = _dynsec_client("dev-a", "pa", [
        {"acltype": "subscribePattern", "topic": "knet/v1/lab/dev-a/#", "allow": True}])
    doc = {"defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                                "subscribe": False, "unsubscribe": True},
           "clients": [client], "groups": [], "roles": [role]}
    conf = tmp_path / "dynsec.json"
    conf.write_text(json.dumps(doc))
    settings = _PluginSettings(port=free_port(), allow_anonymous=False,
                               plugin_lines=[f"plugin {plugin}",
                                             f"plugin_opt_config_file {conf}"])
    with Mosquitto(tmp_path / "broker", settings) as broker:
        yield broker


def test_subscribe_and_wait_returns_after_the_suback_and_names_a_refusal(
        acl_broker: Mosquitto) -> None:
    own, foreign = "knet/v1/lab/dev-a/#", "knet/v1/lab/dev-b/#"
    got: list[str] = []
    c = make_client(endpoint(acl_broker, username="dev-a", password=SecretStr("pa")))
    c.on_message = lambda _c, _u, m: got.append(m.topic)
    with pytest.raises(SubscribeError):  # not connected yet: nothing to wait for
        c.subscribe_and_wait(own, 1)
    c.start()
    try:
        assert c.wait_connected(10)
        assert c.subscribe_and_wait(own, 5) == [1]
        # Subscribed once it returns: no sleep between the SUBACK and the first message.
        c.publish("knet/v1/lab/dev-a/probe", b"x", qos=1).wait_for_publish(5)
        assert wait_until(lambda: got == ["knet/v1/lab/dev-a/probe"], 5)
        with pytest.raises(SubscriptionRefused) as refused:
            c.subscribe_and_wait([(own, 1), (foreign, 1)], 5)
        assert list(refused.value.refused) == [foreign]
        assert "authorized" in refused.value.refused[foreign]
        assert c.wait_subscribed([own], 1) == [1]
        with pytest.raises(SubscriptionRefused):
            c.wait_subscribed([foreign], 1)
        with pytest.raises(SubscribeTimeout):
            c.wait_subscribed(["never/subscribed"], 0.2)
    finally:
        c.stop()


def test_wait_subscribed_covers_a_resubscribe_on_reconnect(mosquitto: Mosquitto) -> None:
    c: KnetClient = make_client(endpoint(mosquitto, reconnect_min_delay=0.05,
                                         reconnect_max_delay=0.2))
    drops: list[int] = []
    c.on_connect = lambda client, *_: client.subscribe([("lab/a", 1), ("lab/b", 0)])
    c.on_disconnect = lambda *_: drops.append(1)
    c.start()
    try:
        assert c.wait_subscribed(["lab/a", "lab/b"], 10) == [1, 0]
        mosquitto.restart()  # the SUBACKs were this connection's: earned again after it
        assert wait_until(lambda: bool(drops), 10)
        assert c.wait_subscribed(["lab/a", "lab/b"], 10) == [1, 0]
    finally:
        c.stop()
