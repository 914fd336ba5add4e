"""Signed update manifests: signature, key rotation, size limits, targeting (no broker)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.infer.manifest import BlockEntry, PartitionManifest
from agent.update.signing import SigningError, key_id, load_public_key, load_public_keys
from agent.update.update_manifest import (
    MAX_BLOCK_SIZE,
    MAX_MANIFEST_BYTES,
    ChunkInfo,
    Targets,
    UpdateManifest,
    UpdateRejected,
    Variant,
    parse_signed,
    unsigned_payload,
)
from cloud_trainer.release.keys import generate_keypair, load_private_key, sign_manifest
from cloud_trainer.release.publisher import make_update

FLEET = "lab"


def toy_model(directory: Path, sizes: list[int], *, version: int = 1, seed: int = 0,
              model_id: str = "toy") -> PartitionManifest:
    """Random bytes standing in for ONNX block files, and their partition manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    blocks = []
    for i, size in enumerate(sizes, 1):
        data = _prng(seed * 1000 + i, size)
        (directory / f"block{i}.onnx").write_bytes(data)
        blocks.append(BlockEntry(index=i, file=f"block{i}.onnx", size=size,
                                 sha256=hashlib.sha256(data).hexdigest(),
                                 input_shape=(4,), output_shape=(4,)))
    return PartitionManifest(model_id=model_id, model_version=version, opset=17, ir_version=8,
                             num_blocks=len(sizes), boundaries=((4,),) * (len(sizes) + 1),
                             blocks=tuple(blocks))


def _prng(seed: int, size: int) -> bytes:
    out, counter = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


@pytest.fixture
def update(tmp_path: Path) -> UpdateManifest:
    part = toy_model(tmp_path / "export", [10_000, 300_000, 5_000])
    manifest, _files = make_update(FLEET, "toy", 1, {"": (part, tmp_path / "export")})
    return manifest


def test_signed_manifest_verifies_and_round_trips(update: UpdateManifest) -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_manifest(update, key)
    got = parse_signed(signed.payload(), {key_id(key.public_key()): key.public_key()},
                       fleet=FLEET)
    assert got == update
    assert got.variants[0].chunks[got.variants[0].partition.block(2).sha256].count == 2
    # A list of keys works as well as a {key_id: key} map.
    assert parse_signed(signed.payload(), [key.public_key()]) == update


def test_forged_manifest_is_rejected(update: UpdateManifest) -> None:
    key = Ed25519PrivateKey.generate()
    keys = [key.public_key()]
    doc = json.loads(sign_manifest(update, key).payload())
    doc["manifest"]["version"] = 2  # tampered after signing
    doc["manifest"]["variants"][0]["partition"]["model_version"] = 2
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(json.dumps(doc).encode(), keys)
    assert exc.value.reason == "bad_signature"
    # Signed by an attacker's key but claiming the fleet key's id.
    forged = sign_manifest(update, Ed25519PrivateKey.generate())
    doc = json.loads(forged.payload())
    doc["key_id"] = key_id(key.public_key())
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(json.dumps(doc).encode(), keys)
    assert exc.value.reason == "bad_signature"
    doc["signature"] = "not base64!!"
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(json.dumps(doc).encode(), keys)
    assert exc.value.reason == "bad_signature"


def test_unsigned_manifest_needs_explicit_dev_mode(update: UpdateManifest) -> None:
    payload = unsigned_payload(update)
    key = Ed25519PrivateKey.generate().public_key()
    for keys, allow in (([key], True), ([key], False), (None, False)):
        with pytest.raises(UpdateRejected) as exc:
            parse_signed(payload, keys, allow_unsigned=allow)
        assert exc.value.reason == "unsigned"
    assert parse_signed(payload, None, allow_unsigned=True) == update


def test_unknown_key_is_rejected(update: UpdateManifest) -> None:
    signed = sign_manifest(update, Ed25519PrivateKey.generate())
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(signed.payload(), [Ed25519PrivateKey.generate().public_key()])
    assert exc.value.reason == "unknown_key"
    with pytest.raises(UpdateRejected) as exc:  # a signed manifest on an unconfigured device
        parse_signed(signed.payload(), None, allow_unsigned=True)
    assert exc.value.reason == "unknown_key"


def test_key_rotation_accepts_either_configured_key(update: UpdateManifest,
                                                    tmp_path: Path) -> None:
    old_priv, old_pub = generate_keypair(tmp_path / "keys", "old")
    new_priv, new_pub = generate_keypair(tmp_path / "keys", "new")
    keys = load_public_keys([old_pub, new_pub.read_text()])
    assert len(keys) == 2
    for priv in (old_priv, new_priv):
        signed = sign_manifest(update, load_private_key(priv))
        assert parse_signed(signed.payload(), keys) == update
    # After the old key is retired, its manifests no longer pass.
    retired = {k: v for k, v in keys.items() if k == key_id(load_public_key(new_pub))}
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(sign_manifest(update, load_private_key(old_priv)).payload(), retired)
    assert exc.value.reason == "unknown_key"


def test_keypair_files(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert key_id(load_private_key(priv).public_key()) == key_id(load_public_key(pub))
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)  # never overwrite a fleet's key
    with pytest.raises(SigningError):
        load_public_key(priv)  # a private key is not a public key
    with pytest.raises(SigningError):
        load_public_key(tmp_path / "missing.pub")


def test_oversize_manifest_rejected_before_parsing() -> None:
    # Not even JSON: only the size check can have produced the reason.
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(b"{" * (MAX_MANIFEST_BYTES + 1), None, allow_unsigned=True)
    assert exc.value.reason == "too_large"
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(b"{" * 200, None, max_bytes=100)
    assert exc.value.reason == "too_large"


def test_declared_sizes_over_the_limits_are_too_large(update: UpdateManifest) -> None:
    doc = update.model_dump(mode="json")
    block = doc["variants"][0]["partition"]["blocks"][0]
    block["size"] = MAX_BLOCK_SIZE + 1
    doc["variants"][0]["chunks"][block["sha256"]]["count"] = 257
    doc["variants"][0]["chunks"][block["sha256"]]["sha256"] *= 257
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(json.dumps({"manifest": doc}).encode(), None, allow_unsigned=True)
    assert exc.value.reason == "too_large"
    doc = update.model_dump(mode="json")
    next(iter(doc["variants"][0]["chunks"].values()))["chunk_size"] = 1 << 20
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(json.dumps({"manifest": doc}).encode(), None, allow_unsigned=True)
    assert exc.value.reason == "too_large"


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(surprise=1),  # extra fields are refused
    lambda d: d.update(version=0),
    lambda d: d["variants"][0]["partition"]["blocks"][0].update(file="../../etc/passwd"),
    lambda d: next(iter(d["variants"][0]["chunks"].values()))["sha256"].pop(),
    lambda d: d["variants"][0]["partition"].update(model_version=7),
    lambda d: d.update(variants=[]),
])
def test_malformed_manifests(update: UpdateManifest, mutate: object) -> None:
    doc = update.model_dump(mode="json")
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(json.dumps({"manifest": doc}).encode(), None, allow_unsigned=True)
    assert exc.value.reason == "malformed"
    for bad in (b"\xff\xfe", b"[]", b'{"manifest": 1}', b'{"manifest": {}, "x": 1}', b"NaN"):
        with pytest.raises(UpdateRejected) as exc:
            parse_signed(bad, None, allow_unsigned=True)
        assert exc.value.reason == "malformed"


def test_wrong_fleet(update: UpdateManifest) -> None:
    with pytest.raises(UpdateRejected) as exc:
        parse_signed(unsigned_payload(update), None, allow_unsigned=True, fleet="other")
    assert exc.value.reason == "wrong_fleet"


def test_targets_and_variants(tmp_path: Path) -> None:
    part = toy_model(tmp_path / "a", [5000, 5000])
    pi = toy_model(tmp_path / "b", [6000, 6000], seed=1)
    manifest, files = make_update(
        FLEET, "toy", 1, {"*": (part, tmp_path / "a"), "rpi4,rpi5": (pi, tmp_path / "b")},
        targets=Targets(devices=["cam-1"], profiles=["rpi4"]))
    assert len(files) == 4
    assert manifest.targets_device("cam-1", "x86")
    assert manifest.targets_device("cam-2", "rpi4")
    assert not manifest.targets_device("cam-2", "x86")
    assert manifest.variant_for("rpi5").profiles == ["rpi4", "rpi5"]
    assert manifest.variant_for("jetson").profiles == []
    everyone = manifest.model_copy(update={"targets": Targets()})
    assert everyone.targets_device("anyone", "any")
    only_pi = UpdateManifest(fleet=FLEET, model_id="toy", version=1,
                             variants=[manifest.variant_for("rpi4")])
    with pytest.raises(UpdateRejected) as exc:
        only_pi.variant_for("x86")
    assert exc.value.reason == "no_variant"


def test_chunk_info_lengths() -> None:
    info = ChunkInfo(chunk_size=4096, count=3, sha256=["0" * 64] * 3)
    assert [info.chunk_length(n, 10_000) for n in range(3)] == [4096, 4096, 1808]
    with pytest.raises(IndexError):
        info.chunk_length(3, 10_000)


def test_variant_rejects_partial_partition(tmp_path: Path, update: UpdateManifest) -> None:
    v = update.variants[0]
    with pytest.raises(ValueError, match="whole model"):
        Variant(partition=v.partition.slice(1, 2), chunks=v.chunks)


def test_signature_covers_canonical_json(update: UpdateManifest) -> None:
    """Whitespace and key order of the payload do not matter; the content does."""
    key = Ed25519PrivateKey.generate()
    doc = json.loads(sign_manifest(update, key).payload())
    pretty = json.dumps(doc, indent=3, sort_keys=False).encode()
    assert parse_signed(pretty, [key.public_key()]) == update
    raw = base64.b64decode(doc["signature"])
    assert len(raw) == 64
