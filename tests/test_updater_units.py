"""The update path's pieces without a broker: config section, persisted state, self-test,
canary ring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from agent_helpers import agent_config, write_config
from update_helpers import Versions, versions

from agent.config import check_partition, load_config
from agent.configfile import ConfigError
from agent.infer.manifest import PartitionManifest
from agent.infer.profiles import load_profile
from agent.infer.runtime import BlockRunner
from agent.update.active import MAX_SEEN, ActiveStore, UpdateState, VersionRecord, damaged_blocks
from agent.update.canary import CanaryRecorder
from agent.update.selftest import self_test

PROFILE = load_profile("x86-dev")


@pytest.fixture(scope="module")
def v(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    return versions(lambda: tmp_path_factory.mktemp("versions"))


def runner(v: Versions, name: str) -> BlockRunner:
    part, directory = v.get(name)
    return BlockRunner(part, directory, PROFILE)


def config_with(tmp_path: Path, v: Versions, update: dict[str, object]) -> Path:
    _p, d1 = v.get("v1")
    cfg = agent_config(tmp_path, 1883, d1 / "manifest.json")
    extra = write_config(tmp_path / "extra.toml", {"update": update})
    cfg.write_text(cfg.read_text() + "\n" + extra.read_text())
    return cfg


# -- [update] config
def test_update_section_defaults_off_and_needs_a_trust_anchor(tmp_path: Path,
                                                              v: Versions) -> None:
    assert load_config(config_with(tmp_path, v, {})).update.enabled is False
    with pytest.raises(ConfigError, match=r"update.*public_keys"):
        load_config(config_with(tmp_path, v, {"enabled": True}))
    with pytest.raises(ConfigError, match="allow_unsigned is refused"):
        load_config(config_with(tmp_path, v, {"enabled": True, "public_keys": [v.pub],
                                              "allow_unsigned": True}))
    with pytest.raises(ConfigError, match="agreement_threshold"):
        load_config(config_with(tmp_path, v, {"enabled": True, "public_keys": [v.pub],
                                              "agreement_threshold": 1.5}))
    with pytest.raises(ConfigError, match="canary"):
        load_config(config_with(tmp_path, v, {"enabled": True, "public_keys": [v.pub],
                                              "canary": 3}))


def test_bad_key_file_is_named_by_the_deployment_check(tmp_path: Path, v: Versions) -> None:
    (tmp_path / "not-a-key.pub").write_text("hello")
    cfg = load_config(config_with(tmp_path, v, {"enabled": True,
                                                "public_keys": ["not-a-key.pub"]}))
    assert cfg.update.public_keys == [tmp_path / "not-a-key.pub"]  # relative to the file
    manifest = PartitionManifest.load(cfg.model.manifest)
    with pytest.raises(ConfigError, match=r"update\.public_keys: not a PEM public key"):
        check_partition(cfg, manifest, PROFILE)
    good = load_config(config_with(tmp_path, v, {"enabled": True, "public_keys": [v.pub]}))
    check_partition(good, manifest, PROFILE)
    assert len(good.update.load_keys()) == 1


# -- persisted state
def record(v: Versions, name: str, digest: str) -> VersionRecord:
    part, _d = v.get(name)
    return VersionRecord(model_id=part.model_id, version=part.model_version, digest=digest,
                         partition=part)


def test_state_round_trips_and_a_torn_write_leaves_the_old_state(tmp_path: Path,
                                                                 v: Versions) -> None:
    store = ActiveStore(tmp_path / "update")
    assert store.load() == UpdateState()
    state = UpdateState(current=record(v, "v2-head", "a" * 64),
                        last_known_good=record(v, "v1", "b" * 64))
    state.remember("applied", "a" * 64)
    store.save(state)
    # a crash after the temporary file was written but before the rename
    (tmp_path / "update" / ".active.json.x.tmp").write_text('{"torn": ')
    assert store.load() == state
    assert store.load().keep_shas() == ({b.sha256 for b in v.get("v1")[0].blocks}
                                        | {b.sha256 for b in v.get("v2-head")[0].blocks})


def test_unreadable_state_is_set_aside(tmp_path: Path) -> None:
    store = ActiveStore(tmp_path)
    store.path.write_text('{"format_version": 1, "current": 17}')
    assert store.load() == UpdateState()
    assert (tmp_path / "active.json.corrupt").is_file() and not store.path.exists()


def test_seen_lists_are_bounded_and_ordered() -> None:
    state = UpdateState()
    for i in range(MAX_SEEN + 10):
        state.remember("rejected", f"{i:064x}")
    state.remember("rejected", f"{20:064x}")  # seen again: moves to the end
    assert len(state.rejected) == MAX_SEEN and state.rejected[-1] == f"{20:064x}"
    state.forget(f"{20:064x}")
    assert f"{20:064x}" not in state.rejected


def test_damaged_blocks_are_found(tmp_path: Path, v: Versions) -> None:
    part, directory = v.get("v1")
    rec = record(v, "v1", "c" * 64)
    assert damaged_blocks(rec, directory) == []
    copy = tmp_path / "blocks"
    copy.mkdir()
    for b in part.blocks[1:]:
        data = (directory / b.file).read_bytes()
        if b.index == 3:
            data = data[:-1] + bytes([data[-1] ^ 1])
        (copy / b.file).write_bytes(data)
    assert damaged_blocks(rec, copy) == [part.blocks[0].sha256, part.blocks[2].sha256]


# -- self-test
def canaries(n: int = 16) -> list[np.ndarray]:
    from cloud_trainer.models.data import digits_splits

    return list(digits_splits().x_test[:n].reshape(n, 1, 8, 8).astype(np.float32))


def test_self_test_passes_a_small_change_and_refuses_nan(v: Versions) -> None:
    old = runner(v, "v1")
    ok = self_test(runner(v, "v2-head"), old, canaries(), threshold=0.9, min_canaries=4)
    assert ok.ok and ok.agreement == 1.0 and ok.canaries == 16
    bad = self_test(runner(v, "v2-nan"), old, canaries(), threshold=0.0, min_canaries=4)
    assert not bad.ok and bad.reason == "self_test_failed" and "block 4" in bad.detail
    # no canaries yet: shapes and finiteness still checked, agreement skipped
    assert not self_test(runner(v, "v2-nan"), old, [], threshold=0.0, min_canaries=4).ok
    skipped = self_test(runner(v, "v2-head"), old, [], threshold=1.0, min_canaries=4)
    assert skipped.ok and "not checked" in skipped.detail


def test_extreme_but_finite_canaries_do_not_fail_a_legitimate_update(v: Versions) -> None:
    """3e38 everywhere is a finite input any client on the input topic can send: the
    running version stays (barely) finite on it, the retrained blocks overflow to Inf."""
    old, new = runner(v, "v1"), runner(v, "v2-full")
    extreme = [np.full((1, 8, 8), 3e38, np.float32) for _ in range(8)]
    assert np.isfinite(old.run(np.stack(extreme))[-1]).all()
    assert not np.isfinite(new.run(np.stack(extreme))[-1]).all()  # what failed the update
    ok = self_test(new, old, extreme + canaries(), threshold=0.0, min_canaries=4)
    assert ok.ok and ok.canaries == 16, ok
    only = self_test(new, old, extreme, threshold=0.0, min_canaries=4)
    assert only.ok and "not checked" in only.detail, only
    # A genuinely broken update still fails on the inputs the running version handles.
    bad = self_test(runner(v, "v2-nan"), old, extreme + canaries(), threshold=0.0,
                    min_canaries=4)
    assert not bad.ok and bad.reason == "self_test_failed"


def test_canary_ring_keeps_only_inputs_the_running_version_handled() -> None:
    ring = CanaryRecorder(4)
    good, extreme = np.zeros((1, 8, 8), np.float32), np.full((1, 8, 8), 3e38, np.float32)
    ring.record(good, None, 0.9, np.array([[0.1, 0.9]], np.float32))
    ring.record(extreme, None, float("nan"), np.array([[np.inf, 0.0]], np.float32))
    ring.record(extreme, None, 1.0, np.array([[2.4e36, 0.0]], np.float32))  # finite, huge
    assert len(ring.inputs()) == 1 and ring.inputs()[0] is good and ring.skipped == 2


def test_self_test_agreement_threshold_and_slices(v: Versions) -> None:
    old, full = runner(v, "v1"), runner(v, "v2-full")
    score = self_test(full, old, canaries(), threshold=0.0, min_canaries=4).agreement
    assert score is not None and 0.0 <= score <= 1.0
    refused = self_test(full, old, canaries(), threshold=score + 0.01, min_canaries=4)
    assert not refused.ok and "agreement" in refused.detail
    # a slice that ends inside the model: cosine similarity of its last boundary
    p1, d1 = v.get("v1")
    p2, d2 = v.get("v2-head")
    head_old = BlockRunner(p1.slice(1, 3), d1, PROFILE)
    head_new = BlockRunner(p2.slice(1, 3), d2, PROFILE)  # blocks 1..3 unchanged
    same = self_test(head_new, head_old, canaries(), threshold=0.999, min_canaries=4)
    assert same.ok and same.agreement == pytest.approx(1.0)
    other = self_test(BlockRunner(p2.slice(1, 2), d2, PROFILE), head_old, canaries(),
                      threshold=0.0, min_canaries=4)
    assert not other.ok and other.reason == "incompatible"


# -- canary ring
def test_canary_ring_is_bounded_and_tags_confidences() -> None:
    ring = CanaryRecorder(4)
    a, b = object(), object()
    xs = [np.full((1, 8, 8), i, np.float32) for i in range(10)]
    for i, x in enumerate(xs):
        ring.record(x, a if i < 7 else b, 0.1 * i)
    assert [int(x[0, 0, 0]) for x in ring.inputs()] == [6, 7, 8, 9]
    assert ring.confidences(b) == pytest.approx([0.7, 0.8, 0.9])
    off = CanaryRecorder(0)
    off.record(xs[0], a, 0.5)
    assert off.inputs() == [] and off.confidences(a) == []


# -- health watch: the error-rate path (the confidence path runs against Mosquitto)
class RecordingLink:
    """Link-like: records publishes (reports, birth) as if the broker took them."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def subscribe(self, *_: object) -> None: ...

    def unsubscribe(self, *_: object) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 0, **_: object) -> bool:
        self.published.append((topic, payload))
        return True

    def publish_reliable(self, topic: str, payload: bytes) -> bool:
        return self.publish(topic, payload)


def test_error_rate_after_a_swap_rolls_back_and_persists(tmp_path: Path, v: Versions) -> None:
    import json as _json
    import time as _time

    from agent.config import UpdateHealthSection, UpdateSection
    from agent.infer.pipeline import RunnerSlot
    from agent.update.active import update_paths
    from agent.update.updater import Updater, _Job
    from agent.wire.topics import Topics

    p2, _d2 = v.get("v2-head")
    old, new = runner(v, "v1"), runner(v, "v2-head")
    counts = [100, 0]  # (inferred, failed) as the inference stage counts them
    cfg = UpdateSection(enabled=True, public_keys=[v.pub], health=UpdateHealthSection(
        watch_s=60, min_inputs=10, max_error_rate=0.1, confidence_drop=0))
    store, cache = update_paths(tmp_path)
    link, slot = RecordingLink(), RunnerSlot(old)
    swaps: list[int] = []
    upd = Updater(cfg, device="dev-1", topics=Topics("lab"), profile=PROFILE, link=link,
                  slot=slot, recorder=CanaryRecorder(8), store=store, cache=cache,
                  on_swap=lambda r: swaps.append(r.version),
                  infer_counts=lambda: (counts[0], counts[1]))
    job = _Job(b"manifest", "d" * 64, _time.monotonic())
    base = {"model_id": "digits", "version": 2, "from_version": 1}
    upd._install(new, old, p2, job, None, base)
    assert slot.current is new and upd.watching and store.load().current is not None
    counts[0] += 30  # 30 good inferences, 2 failures: 6 % < 10 %
    counts[1] += 2
    upd._check_health()
    assert upd.watching and slot.current is new
    counts[1] += 5  # 7 of 37 failed
    upd._check_health()
    assert slot.current is old and not upd.watching and swaps == [2, 1]
    state = store.load()
    assert state.current is None and "d" * 64 in state.rejected  # back on the configured v1
    last = _json.loads(link.published[-1][1])
    assert (last["status"], last["reason"], last["version"], last["from_version"]) == (
        "rolled_back", "health_degraded", 2, 1)
    assert "error rate 7/37" in last["detail"]


def _offline_updater(tmp_path: Path, v: Versions, **cfg: object) -> tuple[object, RecordingLink]:
    from agent.config import UpdateSection
    from agent.infer.pipeline import RunnerSlot
    from agent.update.active import update_paths
    from agent.update.updater import Updater
    from agent.wire.topics import Topics

    store, cache = update_paths(tmp_path)
    link = RecordingLink()
    upd = Updater(UpdateSection(enabled=True, **cfg), device="dev-1",  # type: ignore[arg-type]
                  topics=Topics("lab"), profile=PROFILE, link=link,
                  slot=RunnerSlot(runner(v, "v1")), recorder=CanaryRecorder(8), store=store,
                  cache=cache)
    return upd, link


def _handled(upd: object, payload: bytes) -> dict[str, object]:
    import json as _json
    import time as _time

    from agent.update.updater import _Job, payload_digest

    upd._handle(_Job(payload, payload_digest(payload), _time.monotonic()))  # type: ignore[attr-defined]
    return _json.loads(upd.link.published[-1][1])  # type: ignore[attr-defined,no-any-return]


def test_unsigned_manifest_only_on_a_keyless_development_device(tmp_path: Path,
                                                                v: Versions) -> None:
    from agent.update.update_manifest import unsigned_payload
    from cloud_trainer.release.publisher import make_update

    p1, d1 = v.get("v1")
    manifest, _files = make_update("lab", "digits", 1, {"": (p1, d1)})
    dev, _ = _offline_updater(tmp_path / "dev", v, allow_unsigned=True)
    assert _handled(dev, unsigned_payload(manifest))["status"] == "applied"  # v1 runs
    prod, _ = _offline_updater(tmp_path / "prod", v, public_keys=[v.pub])
    assert _handled(prod, unsigned_payload(manifest))["reason"] == "unsigned"


def test_wrong_fleet_and_missing_variant_are_refused(tmp_path: Path, v: Versions) -> None:
    from cloud_trainer.release.keys import sign_manifest
    from cloud_trainer.release.publisher import make_update

    p1, d1 = v.get("v1")
    upd, _ = _offline_updater(tmp_path, v, public_keys=[v.pub])
    other = make_update("yard", "digits", 1, {"": (p1, d1)})[0]
    assert _handled(upd, sign_manifest(other, v.key).payload())["reason"] == "wrong_fleet"
    rpi = make_update("lab", "digits", 1, {"rpi4": (p1, d1)})[0]
    assert _handled(upd, sign_manifest(rpi, v.key).payload())["reason"] == "no_variant"


def test_key_rotation_both_keys_accepted_until_the_old_one_is_removed(
        tmp_path: Path, v: Versions) -> None:
    from update_helpers import write_public_key

    from cloud_trainer.release.keys import sign_manifest
    from cloud_trainer.release.publisher import make_update

    p1, d1 = v.get("v1")
    new_pub = write_public_key(v.other_key, tmp_path / "new.pub")
    manifest = make_update("lab", "digits", 1, {"": (p1, d1)})[0]
    both, _ = _offline_updater(tmp_path / "both", v, public_keys=[v.pub, new_pub])
    assert _handled(both, sign_manifest(manifest, v.key).payload())["status"] == "applied"
    again = make_update("lab", "digits", 1, {"": (p1, d1)})[0]  # another created_at
    assert _handled(both, sign_manifest(again, v.other_key).payload())["status"] == "applied"
    retired, _ = _offline_updater(tmp_path / "retired", v, public_keys=[new_pub])
    assert _handled(retired, sign_manifest(manifest, v.key).payload())["reason"] == \
        "unknown_key"
