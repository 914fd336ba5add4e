"""Broker configuration, ACL rendering, provisioning files and the dev PKI (no broker run)."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from agent.config import DeviceSection, MqttSection
from agent.wire.topics import TopicError
from broker import certs as pki
from broker.acl import render_acl
from broker.config import BrokerSettings, TlsListener
from broker.provision import (
    TEMPLATE_DIR,
    Credentials,
    ProvisionError,
    create_certs,
    fleet_settings,
    layout,
    load_registry,
    provision_device,
    provision_trainer,
    revoke_device,
    template_texts,
)
from cloud_trainer.release.keys import generate_keypair
from cloud_trainer.trainer_config import TrainerConfig, load_trainer_config


def test_template_files_are_what_the_code_renders() -> None:
    for name, text in template_texts().items():
        path = TEMPLATE_DIR / name
        assert path.exists(), f"{path} missing: run `python -m broker.provision`"
        assert path.read_text() == text, f"{path} is stale: run `python -m broker.provision`"


def test_templates_lock_the_broker_down() -> None:
    t = template_texts()
    for conf in (t["mosquitto.dev.conf"], t["mosquitto.tls.conf"]):
        lines = conf.splitlines()
        assert "allow_anonymous false" in lines
        assert "persistence true" in lines
        assert any(line.startswith("password_file ") for line in lines)
        assert any(line.startswith("acl_file ") for line in lines)
        assert "max_queued_messages 200000" in lines  # not Mosquitto's lossy default of 1000
        assert "listener 1883 127.0.0.1" in lines
        # Every listener binds a session to its username (tests/test_broker_identity.py).
        assert conf.count("use_username_as_clientid true") == conf.count("listener ")
    assert "user trainer-1.ingest" in t["knet.acl"] and "user trainer-1.split" in t["knet.acl"]
    assert "listener 1883 127.0.0.1" in t["mosquitto.dev.conf"]
    assert t["mosquitto.dev.conf"].count("listener ") == 1
    tls = t["mosquitto.tls.conf"]
    assert "listener 8883 0.0.0.0" in tls and "listener 8884 0.0.0.0" in tls
    assert "use_identity_as_username true" in tls and "crlfile " in tls
    assert "pattern" not in t["knet.acl"]


def test_settings_reject_inconsistent_listeners(tmp_path: Path) -> None:
    tls = {"cafile": tmp_path / "ca", "certfile": tmp_path / "c", "keyfile": tmp_path / "k"}
    with pytest.raises(ValidationError, match="require_certificate"):
        TlsListener(**tls, use_identity_as_username=True)
    with pytest.raises(ValidationError, match="distinct ports"):
        BrokerSettings(port=8883, tls=TlsListener(**tls, port=8883))
    with pytest.raises(ValidationError, match="use_identity_as_username"):
        BrokerSettings(mtls=TlsListener(**tls, require_certificate=True))
    with pytest.raises(ValidationError, match="duration"):
        BrokerSettings(persistent_client_expiration="30 days")
    with pytest.raises(ValidationError):
        BrokerSettings(max_queued_messsages=5)  # typo: unknown keys are rejected


def test_acl_confines_each_device_to_its_fleet_subtree() -> None:
    text = render_acl({"cam-01": "lab", "gate-01": "yard"}, {"tr-1": ["lab"]})
    blocks = {b.splitlines()[1]: b.splitlines()[2:] for b in text.split("\n\n")[1:]}
    assert blocks["user cam-01"] == ["topic readwrite knet/v1/lab/cam-01/#",
                                     "topic read knet/v1/lab/model/#"]
    assert blocks["user gate-01"] == ["topic readwrite knet/v1/yard/gate-01/#",
                                      "topic read knet/v1/yard/model/#"]
    tr = blocks["user tr-1"]
    assert "topic read knet/v1/lab/+/act" in tr and "topic read knet/v1/lab/+/blobreq" in tr
    assert "topic write knet/v1/lab/+/reply" in tr
    assert "topic readwrite knet/v1/lab/model/#" in tr
    assert "topic readwrite knet/v1/trainer/tr-1/state" in tr
    assert not any("yard" in rule for rule in tr)
    # Deterministic, so regenerating an unchanged registry changes nothing.
    assert text == render_acl({"gate-01": "yard", "cam-01": "lab"}, {"tr-1": ["lab", "lab"]})
    assert "knet2/v1/lab/cam-01/#" in render_acl({"cam-01": "lab"}, {}, prefix="knet2")
    with pytest.raises(ValueError, match="both"):
        render_acl({"x": "lab"}, {"x": ["lab"]})
    with pytest.raises(TopicError):
        render_acl({"Bad_Id": "lab"}, {})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_device_with_password(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    cred = provision_device(d, "cam-01", "lab", host="broker.local", port=1884)
    lay = layout(d)
    assert cred.password and len(cred.password) >= 32
    assert cred.password not in repr(cred)
    # Only the hash is on the broker side; the clear text only in the 0600 bundle file.
    passwd = lay.passwd.read_text()
    assert passwd.startswith("cam-01:$7$") and cred.password not in passwd
    assert cred.password not in lay.registry.read_text()
    assert cred.password_file is not None
    assert cred.password_file.read_text().strip() == cred.password
    assert _mode(cred.password_file) == 0o600 and _mode(lay.passwd) == 0o600
    assert _mode(lay.root) == 0o700 and _mode(cred.bundle) == 0o700
    assert "user cam-01" in lay.acl.read_text()
    assert load_registry(d)["devices"]["cam-01"]["fleet"] == "lab"
    # The snippet is valid agent configuration once placed in the bundle directory.
    doc = tomllib.loads(cred.snippet)
    ctx = {"base_dir": cred.bundle}
    assert DeviceSection.model_validate(doc["device"], context=ctx).fleet == "lab"
    mqtt = MqttSection.model_validate(doc["mqtt"], context=ctx)
    assert (mqtt.host, mqtt.port, mqtt.username) == ("broker.local", 1884, "cam-01")
    secret = mqtt.resolve_password()
    assert secret is not None and secret.get_secret_value() == cred.password
    assert (cred.bundle / "agent.toml").read_text() == cred.snippet


def test_reprovision_rotates_and_fleet_change_needs_revoke(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    first = provision_device(d, "cam-01", "lab")
    hash1 = layout(d).passwd.read_text()
    second = provision_device(d, "cam-01", "lab", password="chosen-by-operator")
    assert second.password == "chosen-by-operator" != first.password
    assert layout(d).passwd.read_text() != hash1
    with pytest.raises(ProvisionError, match="revoke"):
        provision_device(d, "cam-01", "yard")
    with pytest.raises(ProvisionError, match="device account"):
        provision_trainer(d, "cam-01", "lab")
    with pytest.raises(TopicError):
        provision_device(d, "model", "lab")  # reserved: it would collide with model topics
    with pytest.raises(ProvisionError, match="one line"):
        provision_device(d, "cam-02", "lab", password="a\nb")


def test_revoke_removes_every_trace(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    provision_device(d, "cam-01", "lab")
    provision_device(d, "cam-02", "lab")
    assert revoke_device(d, "cam-01")
    lay = layout(d)
    assert "cam-01" not in lay.passwd.read_text() and "cam-02:" in lay.passwd.read_text()
    assert "cam-01" not in lay.acl.read_text()
    assert not lay.bundle("cam-01").exists()
    reg = load_registry(d)
    assert "cam-01" not in reg["devices"] and reg["revoked"][0]["id"] == "cam-01"
    assert not revoke_device(d, "cam-01")
    provision_device(d, "cam-01", "yard")  # revoked ids may be provisioned again


def test_certificate_device_and_crl(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    cred = provision_device(d, "cam-01", "lab")  # a password device first ...
    cred = provision_device(d, "cam-01", "lab", cert=True)  # ... moved to a certificate
    assert cred.password is None and cred.cert_file and cred.key_file and cred.ca_file
    assert "cam-01" not in layout(d).passwd.read_text()  # no password left to log in with
    cert = x509.load_pem_x509_certificate(cred.cert_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-01"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(cred.key_file) == 0o600
    doc = tomllib.loads(cred.snippet)
    assert doc["mqtt"]["port"] == 8884
    assert doc["mqtt"]["tls"] == {"ca_file": "ca.crt", "cert_file": "client.crt",
                                  "key_file": "client.key"}
    assert "password_file" not in doc["mqtt"]
    MqttSection.model_validate(doc["mqtt"], context={"base_dir": cred.bundle})
    with pytest.raises(ProvisionError, match="no password"):
        provision_device(d, "cam-02", "lab", cert=True, password="x")
    # Rotation revokes the previous certificates (the device's and its `bench` connection's,
    # agent/infer/blockbench.py); revocation revokes the current ones.
    def bench_serial(c: object) -> int:
        pem = (c.bundle / "bench" / "client.crt").read_bytes()  # type: ignore[attr-defined]
        return x509.load_pem_x509_certificate(pem).serial_number

    serial1, bench1 = cred.cert_serial, bench_serial(cred)
    cred2 = provision_device(d, "cam-01", "lab", cert=True)
    certs = layout(d).certs
    assert pki.revoked_serials(certs) == {serial1, bench1}
    bench2 = bench_serial(cred2)
    revoke_device(d, "cam-01")
    assert pki.revoked_serials(certs) == {serial1, bench1, cred2.cert_serial, bench2}


def test_server_certificate_names_and_settings(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    with pytest.raises(ProvisionError, match="not a fleet directory"):
        fleet_settings(d, 1883)
    provision_device(d, "cam-01", "lab")
    with pytest.raises(ProvisionError, match="knet broker certs"):
        fleet_settings(d, 1883, tls_port=8883)
    paths = create_certs(d, ["localhost", "127.0.0.1", "broker.example"])
    cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca_before = paths["ca"].read_bytes()
    assert create_certs(d)["ca"].read_bytes() == ca_before  # kept, not replaced
    s = fleet_settings(d, 1883, tls_port=8883, mtls_port=8884)
    assert s.tls and not s.tls.require_certificate and s.tls.crlfile is None
    assert s.mtls and s.mtls.use_identity_as_username and s.mtls.crlfile == paths["crl"]
    assert s.bind_address == s.tls.bind_address == "127.0.0.1"
    conf = s.render()
    assert f"password_file {layout(d).passwd}" in conf
    assert f"acl_file {layout(d).acl}" in conf


def _load_trainer_snippet(cred: Credentials, tmp_path: Path) -> TrainerConfig:
    """The printed snippet merged into a trainer.toml beside it, loaded by knet-trainer's
    own loader: what an operator following docs/broker.md gets."""
    generate_keypair(tmp_path / "keys")
    extra = (f'signing_key_file = "{tmp_path / "keys" / "knet-update.key"}"\n'
             f'state_dir = "{tmp_path / "state"}"\n')
    text = cred.snippet.replace("[trainer]\n", "[trainer]\n" + extra, 1)
    text += '\n[models.digits]\nzoo = "digits"\n'
    path = cred.bundle / "trainer.toml"
    path.write_text(text)
    return load_trainer_config(path)


def test_trainer_snippet_is_a_working_trainer_config(tmp_path: Path) -> None:
    cred = provision_trainer(tmp_path / "fleet", "trainer-1", ["yard", "lab"], tls=True)
    doc = tomllib.loads(cred.snippet)
    assert doc["trainer"]["fleet"] == "lab" and "yard" in cred.snippet
    assert doc["mqtt"]["port"] == 8883 and doc["mqtt"]["tls"] == {"ca_file": "ca.crt"}
    assert doc["mqtt"]["password_file"] == "mqtt.password"
    cfg = _load_trainer_snippet(cred, tmp_path)
    assert (cfg.trainer.id, cfg.trainer.fleet, cfg.mqtt.username) == \
        ("trainer-1", "lab", "trainer-1")
    secret = cfg.mqtt.resolve_password()
    assert secret is not None and secret.get_secret_value() == cred.password
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == cred.bundle / "ca.crt"
    # One broker username per connection, each in the password file with the same secret.
    assert [cfg.mqtt.connection_username(c) for c in (None, "ingest", "split")] == \
        ["trainer-1", "trainer-1.ingest", "trainer-1.split"]
    passwd = layout(tmp_path / "fleet").passwd.read_text()
    assert all(f"{u}:$7$" in passwd for u in ("trainer-1", "trainer-1.ingest",
                                               "trainer-1.split"))
    with pytest.raises(ProvisionError, match="at least one"):
        provision_trainer(tmp_path / "fleet", "trainer-2", [])


def test_certificate_trainer_snippet_has_a_certificate_per_connection(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    cred = provision_trainer(d, "trainer-1", ["lab"], cert=True)
    cfg = _load_trainer_snippet(cred, tmp_path)
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.cert_file == cred.bundle / "client.crt"
    serials = {cred.cert_serial}
    for conn in ("ingest", "split"):
        pem = (cred.bundle / conn / "client.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
            f"trainer-1.{conn}"
        assert (cred.bundle / conn / "client.key").exists()
        serials.add(cert.serial_number)
    revoke_device(d, "trainer-1")
    assert pki.revoked_serials(layout(d).certs) == serials
    assert "trainer-1" not in layout(d).acl.read_text()
