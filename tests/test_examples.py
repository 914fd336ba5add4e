"""The documented example config must stay valid."""

from conftest import REPO

from agent.config import load_config


def test_documented_agent_config_validates() -> None:
    cfg = load_config(REPO / "docs" / "examples" / "agent.toml")
    assert cfg.device.id == "pi4-kitchen" and cfg.uplink.codec == "uint8+lz4"
    assert cfg.mqtt.tls is not None and cfg.source.kind == "images"
