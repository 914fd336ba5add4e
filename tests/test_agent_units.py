"""Agent pieces on their own: profiles, config, runtime, sources, notify, the unit file."""

from __future__ import annotations

import configparser
import socket
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import REPO, exported_digits, write_config

from agent.config import load_config
from agent.configfile import ConfigError
from agent.infer.manifest import PartitionManifest
from agent.infer.profiles import FirmwareProfile, list_profiles, load_profile
from agent.infer.runtime import BlockRunner, InputError, PartitionError
from agent.infer.sources import BadInputs, FrameError, decode_frame, decode_image
from agent.notify import Notifier, watchdog_interval

EXPECTED_PROFILES = {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "x86-dev"}


def test_every_profile_loads_and_validates() -> None:
    assert set(list_profiles()) >= EXPECTED_PROFILES
    for name in list_profiles():
        p = load_profile(name)
        assert isinstance(p, FirmwareProfile) and p.name == name
        assert "CPUExecutionProvider" in p.execution_providers
    assert load_profile("jetson-nano").max_ir_version <= 9  # onnxruntime 1.16.3 era
    assert load_profile("jetson-orin-nano").execution_providers[0] == "TensorrtExecutionProvider"


def test_a_bad_profile_names_file_field_and_reason(tmp_path: Path) -> None:
    text = (REPO / "firmware_profiles" / "rpi4.toml").read_text()
    bad = tmp_path / "rpi4.toml"
    bad.write_text(text.replace("cores = 4", "cores = 0").replace('arch = "aarch64"',
                                                                   'arch = "sparc"'))
    with pytest.raises(ConfigError) as err:
        load_profile(bad)
    assert str(bad) in str(err.value) and "cores" in str(err.value) and "arch" in str(err.value)
    with pytest.raises(ConfigError, match="no firmware profile 'nope'"):
        load_profile("nope")


def base_config(tmp_path: Path, **mqtt: object) -> dict[str, dict[str, object]]:
    return {
        "device": {"id": "cam-1", "fleet": "lab", "state_dir": "state"},
        "model": {"manifest": "model/manifest.json"},
        "mqtt": {"host": "127.0.0.1", **mqtt},
        "source": {"kind": "npz", "path": "inputs.npz"},
    }


def test_config_resolves_relative_paths_against_its_directory(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "agent.toml", base_config(tmp_path)))
    assert cfg.device.state_dir == (tmp_path / "state").resolve()
    assert cfg.model.manifest == (tmp_path / "model" / "manifest.json").resolve()
    assert cfg.uplink.codec == "uint8+lz4" and cfg.uplink.boundaries == [1]


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("mqtt", "port", 70000, "mqtt.port"),
    ("mqtt", "prot", 1883, "mqtt.prot: unknown key"),
    ("device", "id", "Cam_1", "device.id"),
    ("device", "id", "model", "reserved"),
    ("uplink", "codec", "zstd", "uplink.codec"),
    ("uplink", "boundaries", [0, 1], "allow_raw_upload"),
    ("source", "kind", "video", "source"),
])
def test_config_errors_name_the_field(tmp_path: Path, section: str, key: str, value: object,
                                      expected: str) -> None:
    sections = base_config(tmp_path)
    sections.setdefault(section, {})[key] = value
    path = write_config(tmp_path / "agent.toml", sections)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_password_from_a_file_or_a_systemd_credential(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = load_config(write_config(tmp_path / "a.toml", base_config(tmp_path,
                                                                    password_file="pw")))
    assert cfg.mqtt.resolve_password().get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd")
    cfg = load_config(write_config(tmp_path / "b.toml", base_config(
        tmp_path, password_credential="mqtt-password")))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        cfg.mqtt.resolve_password()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert cfg.mqtt.resolve_password().get_secret_value() == "from-systemd"
    with pytest.raises(ConfigError, match="only one of"):
        load_config(write_config(tmp_path / "c.toml", base_config(
            tmp_path, password="x", password_file="pw")))


def test_runner_falls_back_to_cpu_and_rejects_bad_inputs(tmp_path: Path) -> None:
    model = exported_digits(tmp_path)
    manifest = PartitionManifest.load(model / "manifest.json")
    runner = BlockRunner(manifest, model, load_profile("jetson-orin-nano"))
    assert runner.active_providers == ["CPUExecutionProvider"]
    outs = runner.run(np.zeros((3, 1, 8, 8), np.float32))
    assert [o.shape for o in outs] == [(3, 16, 8, 8), (3, 32, 4, 4), (3, 64), (3, 10)]
    with pytest.raises(InputError, match="shape"):
        runner.run(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        runner.run(np.full((1, 1, 8, 8), np.nan, np.float32))


def test_runner_refuses_a_partition_the_profile_cannot_load(tmp_path: Path) -> None:
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.models.zoo import get_pair

    m = export_partition(get_pair("digits").student, tmp_path, model_id="digits",
                         model_version=1, first=1, last=1)  # current exporter: IR 10
    with pytest.raises(PartitionError, match="IR 10"):
        BlockRunner(m, tmp_path, load_profile("jetson-nano"))


def test_frames_decode_or_fail_with_a_frame_error(tmp_path: Path) -> None:
    from PIL import Image

    img = Image.fromarray((np.arange(64, dtype=np.uint8) * 4).reshape(8, 8))
    img.save(tmp_path / "a.png")
    x = decode_frame((tmp_path / "a.png").read_bytes(), (1, 8, 8))
    assert x.shape == (1, 8, 8) and x.min() >= 0 and x.max() <= 1
    rgb = decode_image(tmp_path / "a.png", (3, 16, 16))
    assert rgb.shape == (3, 16, 16)
    for junk in (b"", b"\x89PNG\r\n\x1a\n broken", b"KNCF\x01\x02", b"\x93NUMPY junk"):
        with pytest.raises(FrameError):
            decode_frame(junk, (1, 8, 8))
    bad = BadInputs()
    for _ in range(5):
        bad.add("image", "test")
    assert bad.counts["image"] == 5 and bad.total == 5


def test_notifier_speaks_the_sd_notify_protocol(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier(str(path))
        assert n.ready("warming up") and n.watchdog() and n.stopping()
        msgs = [sock.recv(1024).decode() for _ in range(3)]
    assert msgs == ["READY=1\nSTATUS=warming up", "WATCHDOG=1", "STOPPING=1"]
    assert not Notifier("").enabled and not Notifier("").ready()
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0


def test_abstract_notify_socket() -> None:
    name = f"knet-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier("@" + name).watchdog()
        assert sock.recv(64) == b"WATCHDOG=1"


def test_systemd_unit_is_a_hardened_notify_service_with_a_watchdog() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(REPO / "agent" / "systemd" / "knet-agent.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert svc["StateDirectory"] == "knet" and svc["CacheDirectory"] == "knet"
    assert svc["LoadCredential"].startswith("mqtt-password:")
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert "--config" in svc["ExecStart"] and "HUP" in svc["ExecReload"]


@pytest.mark.parametrize("classes", [2, 10, 64, 65, 1000])
def test_softmax_top1_matches_the_reference(classes: int) -> None:
    from agent.service import softmax_top1

    rng = np.random.default_rng(classes)
    for scale in (0.1, 5.0, 80.0):  # large logits: exp must not overflow
        logits = (rng.standard_normal(classes) * scale).astype(np.float32)
        z = logits.astype(np.float64) - logits.max()
        p = np.exp(z) / np.exp(z).sum()
        k, conf = softmax_top1(logits)
        assert k == int(p.argmax()) and isinstance(k, int)
        assert conf == pytest.approx(float(p.max()), rel=1e-6) and isinstance(conf, float)


def test_frame_latencies_export_prometheus_histograms() -> None:
    from agent.metrics import AgentMetrics

    m = AgentMetrics()
    for dt in (0.0002, 0.0007, 0.003, 5.0):
        m.observe_inference(dt, None, (1, 2), (dt / 4, dt / 2))
    assert m.frames_total == 4 and m.value("knet_frames_total") == 4
    assert m.value("knet_inference_seconds_count") == 4
    assert m.value("knet_inference_seconds_bucket", {"le": "0.001"}) == 2
    assert m.value("knet_inference_seconds_bucket", {"le": "+Inf"}) == 4
    assert m.value("knet_inference_seconds_sum") == pytest.approx(5.0039)
    assert m.value("knet_block_inference_seconds_bucket", {"block": "2", "le": "0.0005"}) == 2
    assert m.value("knet_block_inference_seconds_count", {"block": "1"}) == 4


def test_frame_latencies_fold_many_frames_across_a_swap_while_scraped() -> None:
    """Frames are counted in batches: a bound value counts as "le", a swap's new block tuple
    starts its own rows, and a scrape racing the inference thread loses nothing."""
    import threading

    from agent.metrics import FrameLatencies

    lat = FrameLatencies((0.001, 0.01))
    old, new = (1, 2), (1, 2, 3)
    n = FrameLatencies.FOLD_EVERY * 3 + 17
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            list(lat.collect())

    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for i in range(n):
            blocks = old if i < n // 2 else new
            lat.observe(0.001, blocks, (0.001, 0.02, 0.0)[: len(blocks)])
            if i == 5:
                lat.observe(0.5, old, (0.1,))  # a run that failed after one block
    finally:
        stop.set()
        reader.join()
    families = {f.name: f for f in lat.collect()}
    total = {s.labels["le"]: s.value for s in families["knet_inference_seconds"].samples
             if s.name.endswith("_bucket")}
    assert lat.frames == n + 1 and total == {"0.001": n, "0.01": n, "+Inf": n + 1}
    per_block: dict[tuple[str, str], float] = {}
    for s in families["knet_block_inference_seconds"].samples:
        if s.name.endswith("_count"):
            per_block[(s.labels["block"], "count")] = s.value
        elif s.name.endswith("_bucket"):
            per_block[(s.labels["block"], s.labels["le"])] = s.value
    assert per_block[("1", "count")] == n and per_block[("1", "0.001")] == n
    assert per_block[("2", "count")] == n and per_block[("2", "0.01")] == 0
    assert per_block[("3", "count")] == n - n // 2
