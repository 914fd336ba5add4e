"""A site broker bridged to the cloud broker (`knet broker provision-site`), two real
Mosquitto processes: the cloud goes away for a while with a device streaming on the site;
every sample reaches the cloud trainer's store once, and an update published in the cloud
reaches the device through the bridge (live, and retained for one that connects later)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from agent.mqtt.link import Link, LinkSettings
from agent.mqtt.spool import Spool
from agent.wire.codec import encode
from agent.wire.envelope import Envelope
from agent.wire.topics import Topics
from broker.launcher import Mosquitto, free_port
from broker.provision import (
    fleet_settings,
    load_registry,
    provision_device,
    provision_trainer,
    revoke_accounts,
)
from broker.site import provision_site
from cloud_trainer.ingest.ingestor import Ingestor, IngestSettings
from cloud_trainer.ingest.store import SQLiteSampleStore
from knet_cli.main import main as knet_main

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]
FLEET = "lab"


def _client(port: int, user: str, password: str, received: list[tuple[str, bytes, bool]]
            ) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_message = lambda _c, _u, m: received.append((m.topic, bytes(m.payload), m.retain))
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_site_bridge_survives_a_cloud_outage_and_carries_updates_down(tmp_path: Path) -> None:
    cloud_dir, site_dir = tmp_path / "cloud", tmp_path / "site"
    port, tls_port, site_port = free_port(), free_port(), free_port()
    trainer = provision_trainer(cloud_dir, "trainer-1", FLEET, reload=False)
    rc = knet_main(["broker", "provision-site", "site-a", "--fleet", FLEET, "--dir",
                    str(cloud_dir), "--site-dir", str(site_dir), "--cloud-host", "127.0.0.1",
                    "--cloud-port", str(tls_port), "--outage-hours", "4", "--rate", "50"])
    assert rc == 0
    assert load_registry(cloud_dir)["sites"]["site-a"]["fleets"] == [FLEET]
    acl = (cloud_dir / "knet.acl").read_text()
    assert "user site-a\ntopic write knet/v1/lab/+/act" in acl
    assert "topic write knet/v1/lab/model" not in acl.split("user site-a")[1]
    cam = provision_device(site_dir, "cam-0", FLEET, reload=False)
    assert cam.password is not None and trainer.password is not None
    site_settings = fleet_settings(site_dir, site_port)
    conf = site_settings.render()
    assert "bridge_protocol_version mqttv50" in conf and "cleansession false" in conf
    assert f"address 127.0.0.1:{tls_port}" in conf and "bridge_cafile" in conf
    assert site_settings.max_queued_messages == 4 * 3600 * 50

    topics = Topics(FLEET)
    cloud = Mosquitto(cloud_dir / "broker", fleet_settings(cloud_dir, port, tls_port)).start()
    store = SQLiteSampleStore(tmp_path / "store")
    ingestor = Ingestor(IngestSettings(port=port, username="trainer-1.ingest",
                                       password=trainer.password, client_id="trainer-1.ingest",
                                       shared=False), topics, store)
    try:
        ingestor.start(wait=True)
        assert ingestor.wait_subscribed(10)
        with Mosquitto(site_dir / "broker", site_settings) as site:
            spool = Spool(tmp_path / "spool", 64 << 20)
            link = Link(LinkSettings(port=site.port, username="cam-0",
                                     password=SecretStr(cam.password), reconnect_min_delay=0.2,
                                     reconnect_max_delay=2.0),
                        topics, "cam-0", spool, lambda: {"model_id": "digits"},
                        state_dir=tmp_path / "dev")
            with link:
                assert link.wait_connected(20)
                frame = encode(np.ones((1, 4), np.float32), "raw")
                sent = [0]
                stop = threading.Event()

                def stream() -> None:
                    while not stop.is_set():
                        sent[0] += 1
                        env = Envelope(device="cam-0", session=link.session, seq=sent[0],
                                       timestamp=time.time(), model_version=1, boundary=1,
                                       payload=frame)
                        link.publish_reliable(topics.act("cam-0"), env.pack())
                        stop.wait(0.005)  # pacing: ~200 msg/s

                t = threading.Thread(target=stream, daemon=True)
                t.start()
                assert wait_until(lambda: store.count() >= 100, 60, 0.1)  # through the bridge
                cloud.stop()  # the cloud goes away (its sessions are saved)
                at_cut = sent[0]
                stored_at_cut = store.count()
                # The site broker keeps acknowledging: the device's spool stays empty.
                assert wait_until(lambda: sent[0] >= at_cut + 1000 and len(spool) < 50, 60, 0.1)
                assert store.count() <= stored_at_cut + 50  # only what was in flight
                cloud.start()
                assert wait_until(lambda: sent[0] >= at_cut + 1300, 30, 0.1)
                stop.set()
                t.join(5)
                expected = {("cam-0", link.session, q) for q in range(1, sent[0] + 1)}
                assert wait_until(lambda: store.sample_keys() >= expected, 90, 0.5), \
                    len(expected - store.sample_keys())
                assert store.count() == len(expected)  # once each

                # An update published in the cloud reaches the device through the bridge.
                got: list[tuple[str, bytes, bool]] = []
                dev = _client(site.port, "cam-0.bench", cam.password, got)
                dev.subscribe(f"{topics.fleet_root}/model/#", qos=1)
                assert wait_until(lambda: dev.is_connected(), 10)
                pub_got: list[tuple[str, bytes, bool]] = []
                pub = _client(port, "trainer-1", trainer.password, pub_got)
                manifest, chunk = b'{"signed": "manifest v2"}', bytes(range(256)) * 4
                blob_topic = f"{topics.fleet_root}/model/blob/{'a' * 64}/0"
                # the bridge subscribes on the cloud when it reconnects: retry until it has
                assert wait_until(lambda: (pub.publish(blob_topic, chunk, qos=1).wait_for_publish(5)
                                           or True) and any(g[0] == blob_topic for g in got),
                                  60, 1.0)
                pub.publish(topics.manifest, manifest, qos=1, retain=True).wait_for_publish(10)
                assert wait_until(lambda: (topics.manifest, manifest, False) in got
                                  or (topics.manifest, manifest, True) in got, 30, 0.05), got
                dev.disconnect()
                dev.loop_stop()
                late: list[tuple[str, bytes, bool]] = []  # a device connecting afterwards
                dev2 = _client(site.port, "cam-0.bench", cam.password, late)
                dev2.subscribe(topics.manifest, qos=1)
                assert wait_until(lambda: (topics.manifest, manifest, True) in late, 20, 0.05)
                for c in (pub, dev2):
                    c.disconnect()
                    c.loop_stop()
    finally:
        ingestor.stop()
        store.close()
        cloud.stop()


def test_a_site_account_can_be_revoked(tmp_path: Path) -> None:
    cloud_dir = tmp_path / "cloud"
    provision_site(cloud_dir, "site-b", FLEET, tmp_path / "site", cloud_host="127.0.0.1",
                   reload=False)
    assert "user site-b" in (cloud_dir / "knet.acl").read_text()
    done = revoke_accounts(cloud_dir, ["site-b"], reload=False)
    assert [(r.account, r.kind, r.revoked) for r in done] == [("site-b", "site", True)]
    assert "site-b" not in load_registry(cloud_dir)["sites"]
    assert "site-b" not in (cloud_dir / "knet.acl").read_text()
    assert "site-b" not in (cloud_dir / "passwd").read_text()
