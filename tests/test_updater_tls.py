"""A signed update over the locked-down broker's TLS listener: the agent's Link trusts the
fleet's development CA and logs in with its provisioned password; the trainer publishes
over TLS too. An agent that trusts another CA never connects, and keeps serving offline."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_helpers import write_inputs
from mqtt_helpers import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from update_helpers import FLEET, Versions, agent_toml, running_agent, signed_update, versions

from agent.wire.topics import Topics
from broker import certs as pki
from broker.launcher import Mosquitto, free_port
from broker.provision import fleet_settings, layout, provision_device, provision_trainer
from cloud_trainer.release.publisher import BlobPublisher

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
T = Topics(FLEET)


@pytest.fixture(scope="module")
def v(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    return versions(lambda: tmp_path_factory.mktemp("versions"))


def test_update_over_tls_and_an_untrusted_ca_fails(tmp_path: Path, v: Versions) -> None:
    d = tmp_path / "fleet"
    dev = provision_device(d, "dev-1", FLEET, tls=True)
    tr = provision_trainer(d, "trainer-1", [FLEET], tls=True)
    ports = dict(port=free_port(), tls_port=free_port(), mtls_port=free_port())
    _p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-head")
    write_inputs(tmp_path / "inputs.npz", 64)
    assert dev.ca_file is not None and dev.password and tr.password
    cfg = agent_toml(tmp_path, ports["tls_port"], d1 / "manifest.json", v.pub,
                     mqtt={"password": dev.password}, tls_ca=dev.ca_file)
    with Mosquitto(layout(d).broker, fleet_settings(d, **ports)):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="trainer-1",
                             protocol=mqtt.MQTTv5)
        client.username_pw_set("trainer-1", tr.password)
        client.tls_set(ca_certs=str(tr.ca_file))
        pub = BlobPublisher(client, T, tmp_path / "trainer-blobs", push_delay=0.2)
        client.connect("127.0.0.1", ports["tls_port"], keepalive=10)
        client.loop_start()
        try:
            pub.start()
            assert pub.connected.wait(10)
            with running_agent(cfg) as ag:
                assert wait_until(lambda: ag.metrics.frames_total > 20, 10)
                pub.publish_update(*signed_update(p2, d2, v.key))
                reports = ag.updater.reports  # type: ignore[union-attr]
                assert wait_until(lambda: any(r.terminal for r in reports), 20), reports
                assert [r.status for r in reports] == ["downloading", "downloaded", "applied"]
                assert ag.slot.current.version == 2
                assert ag.link.stats["connect_refused"] == 0
            # The same agent trusting another CA: the handshake fails, it never connects.
            other = pki.create_ca(tmp_path / "other-ca")
            untrusting = agent_toml(tmp_path, ports["tls_port"], d1 / "manifest.json",
                                    v.pub, device="dev-1", mqtt={"password": dev.password},
                                    tls_ca=other.cert)
            with running_agent(untrusting, connect=False) as ag:
                frames = ag.metrics.frames_total
                assert not ag.link.wait_connected(3)
                assert ag.metrics.frames_total > frames + 20  # serving, offline
        finally:
            pub.close()
            client.disconnect()
            client.loop_stop()
