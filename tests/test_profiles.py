"""Firmware profiles: every shipped profile loads, lookups and errors say where and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.configfile import ConfigError
from agent.infer.profiles import FirmwareProfile, find_profile, list_profiles, load_profile

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86-dev"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_profile_loads(name: str) -> None:
    p = load_profile(name)
    assert isinstance(p, FirmwareProfile) and p.name == name
    assert p.execution_providers[-1] == "CPUExecutionProvider"  # the fallback is always last
    assert p.model_memory_mb < p.ram_mb and p.intra_op_threads <= p.cores
    assert p.uplink_mbps > 0 and p.rtt_ms >= 0 and p.max_opset is not None
    assert p.power_idle_w is not None and p.power_active_w is not None
    assert p.power_idle_w <= p.power_active_w
    text = (REPO / "firmware_profiles" / f"{name}.toml").read_text()
    assert text.startswith("#"), "each profile documents its sources in a leading comment"


def test_shipped_set_and_device_specifics() -> None:
    assert set(list_profiles()) >= SHIPPED
    nano = load_profile("jetson-nano")
    assert nano.max_ir_version <= 9 and nano.ort_version < (1, 17)  # onnxruntime 1.16.3 era
    assert not nano.supports_ir(10) and nano.supports_ir(8) and nano.supports_opset(17)
    assert nano.has_gpu and not load_profile("rpi4").has_gpu
    orin = load_profile("jetson-orin-nano")
    assert orin.execution_providers[:2] == ("TensorrtExecutionProvider",
                                            "CUDAExecutionProvider")
    assert load_profile("rpi4").supports_ir(10)
    assert load_profile("x86-dev").relative_speed == 1.0


def test_profiles_are_frozen() -> None:
    p = load_profile("rpi4")
    with pytest.raises(ValueError, match=r"frozen"):
        p.cores = 8  # type: ignore[misc]


def _write(path: Path, source: str = "rpi4", **replace: str) -> Path:
    text = (REPO / "firmware_profiles" / f"{source}.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    return path


def test_errors_name_file_field_and_reason(tmp_path: Path) -> None:
    bad = _write(tmp_path / "rpi4.toml", **{"cores = 4": "cores = 0",
                                            'arch = "aarch64"': 'arch = "sparc"'})
    with pytest.raises(ConfigError) as err:
        load_profile(bad)
    msg = str(err.value)
    assert str(bad) in msg and "cores: Input should be greater than or equal to 1" in msg
    assert "arch:" in msg

    typo = _write(tmp_path / "rpi4.toml", **{"rtt_ms = 25.0": "rtt_msec = 25.0"})
    with pytest.raises(ConfigError, match=r"rtt_msec: unknown key"):
        load_profile(typo)

    gpu = _write(tmp_path / "rpi4.toml",
                 **{'["CPUExecutionProvider"]': '["CudaProvider", "CPUExecutionProvider"]'})
    with pytest.raises(ConfigError, match=r"execution_providers.*unknown execution provider"):
        load_profile(gpu)

    renamed = _write(tmp_path / "other.toml")
    with pytest.raises(ConfigError, match=r"must match the file name 'other'"):
        load_profile(renamed)

    budget = _write(tmp_path / "rpi4.toml", **{"model_memory_mb = 512": "model_memory_mb = 9000"})
    with pytest.raises(ConfigError, match=r"model_memory_mb 9000 must leave room"):
        load_profile(budget)

    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_profile(tmp_path / "broken.toml")


def test_lookup_order_and_unknown_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"no firmware profile 'nope'.*known: .*rpi4"):
        load_profile("nope")
    with pytest.raises(ConfigError, match=r"no such profile file"):
        load_profile(tmp_path / "missing.toml")
    # $KNET_PROFILES comes first: a site can override a shipped profile or add its own
    _write(tmp_path / "rpi4.toml", **{"uplink_mbps = 20.0": "uplink_mbps = 5.0"})
    _write(tmp_path / "pi-zero.toml", **{'name = "rpi4"': 'name = "pi-zero"'})
    monkeypatch.setenv("KNET_PROFILES", str(tmp_path))
    assert find_profile("rpi4") == tmp_path / "rpi4.toml"
    assert load_profile("rpi4").uplink_mbps == 5.0
    assert "pi-zero" in list_profiles() and load_profile("pi-zero").name == "pi-zero"
    monkeypatch.delenv("KNET_PROFILES")
    assert load_profile("rpi4").uplink_mbps == 20.0


def test_site_directory_and_configured_directory_override_the_shipped_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shipped profiles need no setting; /etc/knet/profiles, then a config's profiles_dir
    (then $KNET_PROFILES), shadow them one after the other."""
    import agent.infer.profiles as profiles
    from agent.config import load_config

    monkeypatch.delenv("KNET_PROFILES", raising=False)
    assert find_profile("rpi4") == profiles.PACKAGED_PROFILES / "rpi4.toml"
    site, configured = tmp_path / "etc-knet-profiles", tmp_path / "mine"
    site.mkdir()
    configured.mkdir()
    monkeypatch.setattr(profiles, "SITE_PROFILES", site)
    _write(site / "rpi4.toml", **{"uplink_mbps = 20.0": "uplink_mbps = 7.0"})
    _write(site / "pi-zero.toml", **{'name = "rpi4"': 'name = "pi-zero"'})
    assert load_profile("rpi4").uplink_mbps == 7.0 and "pi-zero" in list_profiles()
    _write(configured / "rpi4.toml", **{"uplink_mbps = 20.0": "uplink_mbps = 3.0"})
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text('[device]\nid = "cam-1"\n[model]\nmanifest = "m/manifest.json"\n'
                        'profile = "rpi4"\nprofiles_dir = "mine"\n[source]\nkind = "mqtt"\n')
    cfg = load_config(cfg_path)
    assert cfg.model.profiles_dir == configured.resolve()
    assert load_profile(cfg.model.profile, [cfg.model.profiles_dir]).uplink_mbps == 3.0
    assert load_profile("pi-zero", [cfg.model.profiles_dir]).name == "pi-zero"
    monkeypatch.setenv("KNET_PROFILES", str(tmp_path / "nothing-here"))
    assert load_profile("rpi4", [None]).uplink_mbps == 7.0
