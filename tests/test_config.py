"""agent.toml: validation with errors naming file/field/reason, secrets, deployment checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agent_helpers import write_config as write
from test_runtime import build_partition

from agent.config import AgentConfig, MqttSource, check_partition, load_config
from agent.configfile import ConfigError
from agent.infer.profiles import load_profile

REPO = Path(__file__).resolve().parent.parent


def sections(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {
        "device": {"id": "cam-1", "fleet": "lab", "state_dir": "state"},
        "model": {"manifest": "model/manifest.json", "profile": "x86-dev"},
        "mqtt": {"host": "127.0.0.1"},
        "source": {"kind": "npz", "path": "inputs.npz"},
    }
    for name, values in overrides.items():
        if name == "source" and "kind" in values:
            out["source"] = dict(values)  # another kind: its own keys only
        else:
            out.setdefault(name, {}).update(values)
    return out


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", sections())
    cfg = load_config(path)
    assert cfg.path == path.resolve()
    assert cfg.device.state_dir == (tmp_path / "state").resolve()
    assert cfg.model.manifest == (tmp_path / "model" / "manifest.json").resolve()
    assert cfg.model_dir == (tmp_path / "model").resolve()
    assert cfg.source.path == (tmp_path / "inputs.npz").resolve()  # type: ignore[union-attr]
    assert cfg.mqtt.username == "cam-1" and cfg.mqtt.port == 1883
    assert cfg.uplink.codec == "uint8+lz4" and cfg.uplink.boundaries == [1]
    assert not cfg.uplink.allow_raw_upload and cfg.spool.policy == "drop_oldest"
    assert cfg.watchdog.enabled and cfg.watchdog.max_stall_s == 30
    assert cfg.topics.act("cam-1") == "knet/v1/lab/cam-1/act"
    assert cfg.device.cache_dir == Path("/var/cache/knet")  # absolute paths stay


def test_mqtt_source_defaults_to_the_device_input_topic(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "a.toml", sections(
        device={"topic_prefix": "acme"}, source={"kind": "mqtt"})))
    assert isinstance(cfg.source, MqttSource)
    assert cfg.source.topic == "acme/v1/lab/cam-1/input" and cfg.source.qos == 1
    cfg = load_config(write(tmp_path / "b.toml", sections(
        source={"kind": "mqtt", "topic": "sensors/cam-1/frames"})))
    assert cfg.source.topic == "sensors/cam-1/frames"  # type: ignore[union-attr]


def test_images_source(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "a.toml", sections(
        source={"kind": "images", "directory": "frames", "glob": "*.jpg", "rate_hz": 2.5,
                "resize": False})))
    assert cfg.source.kind == "images" and cfg.source.directory == (tmp_path / "frames").resolve()  # type: ignore[union-attr]


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("mqtt", "port", 70000, "mqtt.port: Input should be less than or equal to 65535"),
    ("mqtt", "prot", 1883, "mqtt.prot: unknown key"),
    ("mqtt", "keepalive", "30s", "mqtt.keepalive: Input should be a valid integer"),
    ("mqtt", "reconnect_min_delay", 60, "reconnect_min_delay 60.0 > reconnect_max_delay"),
    ("mqtt", "password_credential", "../etc/shadow", "not a path"),
    ("device", "id", "Cam_1", "device.id"),
    ("device", "id", "model", "reserved"),
    ("device", "fleet", "Lab", "device.fleet"),
    ("device", "topic_prefix", "knet/#", "device.topic_prefix"),
    ("device", "colour", "red", "device.colour: unknown key"),
    ("uplink", "codec", "zstd", "uplink.codec"),
    ("uplink", "boundaries", [0, 1], "allow_raw_upload = true"),
    ("uplink", "boundaries", [1, 1], "boundary listed twice"),
    ("uplink", "boundaries", [-1], "boundaries are >= 0"),
    ("uplink", "hard_threshold", 1.5, "uplink.hard_threshold"),
    ("uplink", "every_n", -1, "uplink.every_n"),
    ("spool", "policy", "drop_all", "spool.policy"),
    ("metrics", "prometheus_port", 99999, "metrics.prometheus_port"),
    ("watchdog", "max_stall_s", 0, "watchdog.max_stall_s"),
    ("split", "timeout_s", -1, "split.timeout_s"),
    ("source", "kind", "video", "source"),
    ("source", "rate_hz", -2, "source.npz.rate_hz"),
    ("source", "directory", "x", "source.npz.directory: unknown key"),
    ("surprise", "x", 1, "surprise: unknown key"),
])
def test_errors_name_the_file_and_the_field(tmp_path: Path, section: str, key: str,
                                            value: object, expected: str) -> None:
    path = write(tmp_path / "agent.toml", sections(**{section: {key: value}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_missing_sections_and_bad_files(tmp_path: Path) -> None:
    s = sections()
    del s["source"]
    with pytest.raises(ConfigError, match=r"source: Field required"):
        load_config(write(tmp_path / "a.toml", s))
    (tmp_path / "b.toml").write_text("[device\nid = 1")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(tmp_path / "b.toml")
    with pytest.raises(ConfigError, match=r"no such file"):
        load_config(tmp_path / "missing.toml")


def test_raw_upload_needs_explicit_consent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"boundary 0 is the raw input"):
        load_config(write(tmp_path / "a.toml", sections(uplink={"boundaries": [0]})))
    cfg = load_config(write(tmp_path / "b.toml", sections(
        uplink={"boundaries": [0, 2], "allow_raw_upload": True})))
    assert cfg.uplink.boundaries == [0, 2]


def test_password_from_config_file_or_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = load_config(write(tmp_path / "a.toml", sections(mqtt={"password_file": "pw",
                                                                "username": "other"})))
    assert cfg.mqtt.password_file == (tmp_path / "pw").resolve()
    assert cfg.mqtt.resolve_password().get_secret_value() == "s3cret"  # type: ignore[union-attr]
    assert cfg.mqtt.username == "other"

    cfg = load_config(write(tmp_path / "b.toml", sections(mqtt={"password": "inline"})))
    assert "inline" not in repr(cfg) and "inline" not in str(cfg.model_dump())
    assert cfg.mqtt.resolve_password().get_secret_value() == "inline"  # type: ignore[union-attr]

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    cfg = load_config(write(tmp_path / "c.toml", sections(
        mqtt={"password_credential": "mqtt-password"})))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY is not set"):
        cfg.mqtt.resolve_password()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert cfg.mqtt.resolve_password().get_secret_value() == "from-systemd"  # type: ignore[union-attr]
    (creds / "mqtt-password").unlink()
    with pytest.raises(ConfigError, match=r"mqtt.password_credential: cannot read"):
        cfg.mqtt.resolve_password()

    cfg = load_config(write(tmp_path / "d.toml", sections(mqtt={"password_file": "nope"})))
    with pytest.raises(ConfigError, match=r"mqtt.password_file: cannot read"):
        cfg.mqtt.resolve_password()
    with pytest.raises(ConfigError, match=r"only one of password, password_file"):
        load_config(write(tmp_path / "e.toml", sections(
            mqtt={"password": "x", "password_file": "pw"})))
    assert load_config(write(tmp_path / "f.toml", sections())).mqtt.resolve_password() is None


def test_tls_paths_resolve_and_client_cert_needs_its_key(tmp_path: Path) -> None:
    s = sections()
    s["mqtt.tls"] = {"ca_file": "ca.crt", "cert_file": "dev.crt", "key_file": "dev.key"}
    cfg = load_config(write(tmp_path / "a.toml", s))
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.key_file == (tmp_path / "dev.key").resolve()
    s["mqtt.tls"] = {"ca_file": "ca.crt", "cert_file": "dev.crt"}
    with pytest.raises(ConfigError, match=r"mqtt.tls: .*cert_file and key_file go together"):
        load_config(write(tmp_path / "b.toml", s))


def test_built_in_code_sections_are_not_mutated() -> None:
    from agent.config import DeviceSection, ModelSection, MqttSection, NpzSource

    mqtt = MqttSection()
    cfg = AgentConfig(device=DeviceSection(id="a-1"), model=ModelSection(manifest=Path("/m")),
                      mqtt=mqtt, source=NpzSource(kind="npz", path=Path("/x.npz")))
    assert cfg.mqtt.username == "a-1" and mqtt.username is None and cfg.path is None


def test_documented_example_validates() -> None:
    cfg = load_config(REPO / "docs" / "examples" / "agent.toml")
    assert cfg.device.id == "pi4-kitchen" and cfg.model.profile == "rpi4"
    assert cfg.mqtt.password_credential == "mqtt-password" and cfg.mqtt.tls is not None


def test_check_partition_refuses_what_cannot_run(tmp_path: Path) -> None:
    manifest, _ = build_partition(tmp_path / "model")
    path = write(tmp_path / "agent.toml", sections(uplink={"boundaries": [1, 5]},
                                                   split={"enabled": True}))
    cfg = load_config(path)
    warnings = check_partition(cfg, manifest, load_profile("x86-dev"))
    assert any("[5] are outside this partition (0..2)" in w for w in warnings)
    assert any("split.enabled" in w for w in warnings)
    gpu = check_partition(cfg, manifest, load_profile("jetson-orin-nano"))
    assert any("CPU provider runs instead" in w for w in gpu)  # a warning, not a refusal

    (tmp_path / "model" / "block2.onnx").write_bytes(b"tampered")
    with pytest.raises(ConfigError, match=rf"^{path}: model.manifest: block 2: .*bytes"):
        check_partition(cfg, manifest, load_profile("x86-dev"))

    ir10, _ = build_partition(tmp_path / "model", ir_version=10, opset=20)
    with pytest.raises(ConfigError, match=r"model.profile: .*IR 10.*jetson-nano"):
        check_partition(cfg, ir10, load_profile("jetson-nano"))
    with pytest.raises(ConfigError, match=r"model.profile: .*opset 20"):
        check_partition(cfg, ir10, load_profile("jetson-nano").model_copy(
            update={"max_ir_version": 10}))
    tiny = load_profile("x86-dev").model_copy(update={"model_memory_mb": 16})
    big = ir10.model_copy(update={"blocks": tuple(
        b.model_copy(update={"size": 9 * 2**20}) for b in ir10.blocks)})
    with pytest.raises(ConfigError, match=r"model.manifest: block 1: .* bytes, manifest"):
        check_partition(cfg, big, tiny)  # the file check comes first

    images = load_config(write(tmp_path / "img.toml", sections(
        source={"kind": "images", "directory": "frames"})))
    flat = ir10.slice(2, 2)  # input (8,): not an image
    with pytest.raises(ConfigError, match=r"source.kind: an image source needs"):
        check_partition(images, flat, load_profile("x86-dev"))
