"""`knet-trainer` serves Prometheus metrics: a real daemon, a real broker, a real scrape."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from test_replicas_pg import Replica, Stream, _subscribed
from trainer_helpers import trainer_cli

from broker.launcher import Mosquitto, free_port
from cloud_trainer.metrics import FAMILIES
from cloud_trainer.release.keys import generate_keypair
from knet_lab.fleet import toml_text

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]


def exposition(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}; {} while nothing listens."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(exposition(port)) for s in fam.samples}


def test_trainer_metrics_endpoint(tmp_path: Path) -> None:
    key, _ = generate_keypair(tmp_path / "keys")
    mport = free_port()
    with Mosquitto(tmp_path / "broker") as broker:
        doc = {"trainer": {"id": "trainer-m", "fleet": "bench", "state_dir": tmp_path / "st",
                           "signing_key_file": key, "log_format": "json"},
               "mqtt": {"host": "127.0.0.1", "port": broker.port},
               "models": {"digits": {"zoo": "digits", "profiles": ["x86-dev"]}},
               "metrics": {"prometheus_port": mport},
               "jobs": [{"id": "tick", "model": "digits", "interval_s": 3600,
                         "min_new_samples": 1_000_000}]}
        config = tmp_path / "trainer.toml"
        config.write_text(toml_text(doc))
        replica = Replica(tmp_path, "trainer-m", config).start()
        try:
            assert wait_until(_subscribed([replica]), 180, interval=0.2)
            with Stream(tmp_path, broker.port, ["cam-0", "cam-1"], rate_hz=200) as stream:
                assert wait_until(lambda: stream.sent >= 40, 30, 0.05)
                online = ("knet_trainer_devices_online", ())
                assert wait_until(lambda: scrape(mport).get(online) == 2, 30, 0.2)
                stream.finish()
                sent = sum(d.seq for d in stream.devs)
                bad = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
                bad.connect("127.0.0.1", broker.port)
                bad.loop_start()
                bad.publish("knet/v1/bench/cam-9/act", b"not an envelope", qos=1
                            ).wait_for_publish(10)
                bad.disconnect()
                bad.loop_stop()
                stored = ("knet_trainer_ingest_messages_total", (("outcome", "stored"),))
                malformed = ("knet_trainer_ingest_rejected_total", (("reason", "malformed"),))
                assert wait_until(lambda: scrape(mport).get(stored) == sent
                                  and scrape(mport).get(malformed) == 1, 60, 0.2), \
                    scrape(mport)
            done = trainer_cli(config, "jobs", "run-now", "tick")
            assert done.returncode == 0, done.stdout + done.stderr
            m = scrape(mport)
            families = {f.name for f in text_string_to_metric_families(exposition(mport))}
        finally:
            replica.stop()
    # The table the dashboard's test reads is what a scrape returns, no more, no less.
    assert families == set(FAMILIES)
    assert m[("knet_trainer_store_rows", ())] == sent
    assert m[("knet_trainer_store_bytes", ())] > 0
    assert m[("knet_trainer_runs_total", (("job", "tick"), ("status", "skipped")))] == 1
    assert m[("knet_trainer_leader", ())] == 1.0
    assert m[("knet_trainer_deployed_version", (("model", "digits"),))] == 1
    assert m[("knet_trainer_ingest_queue_depth", ())] == 0
    assert 0 <= m[("knet_trainer_ingest_lag_seconds", ())] < 60
