"""The signed update manifest: what the trainer publishes retained on ``Topics.manifest``.

Wire format (JSON)::

    {"manifest": {UpdateManifest}, "key_id": "<16 hex>", "signature": "<base64 Ed25519>"}

The signed bytes are the canonical JSON of ``manifest`` (sorted keys, no spaces). The device
re-serialises the *parsed JSON object*, not a pydantic model, so the signature is checked
before any schema validation runs and does not depend on how a pydantic version formats
datetimes. Every size limit is checked here, while parsing, so nothing is allocated for a
download until the declared sizes are known to be sane.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from agent import safejson
from agent.errors import KnetAgentError
from agent.infer.manifest import PartitionManifest
from agent.update.signing import PublicKeys, as_key_map, verify
from agent.wire.topics import TopicError, validate_id

MAX_CHUNK_SIZE = 256 * 1024  # one MQTT message per chunk; small enough for a slow uplink
MIN_CHUNK_SIZE = 4096  # tiny chunks would cost a device thousands of round trips
MAX_BLOCK_SIZE = 64 * 1024 * 1024
MAX_BLOCKS = 64
MAX_VARIANTS = 16
MAX_TARGETS = 10_000
# A maxed-out variant (64 blocks of 64 MiB) needs ~1.1 MB of chunk hashes.
MAX_MANIFEST_BYTES = 2 * 1024 * 1024
MAX_MANIFEST_DEPTH = 32  # a real manifest nests about 6 levels
MAX_CHUNKS = MAX_BLOCK_SIZE // MIN_CHUNK_SIZE

_SHA256 = re.compile(r"[0-9a-f]{64}")

Reason = Literal[
    "malformed", "unsigned", "bad_signature", "unknown_key", "too_large", "wrong_fleet",
    "no_variant",
]


class UpdateRejected(KnetAgentError):
    """A manifest the device must not act on; ``reason`` is machine-readable."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _too_large(msg: str) -> PydanticCustomError:
    return PydanticCustomError("too_large", msg)


class ChunkInfo(BaseModel):
    """How one block file is cut into chunks; each chunk has its own sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: int = Field(ge=MIN_CHUNK_SIZE)
    count: int = Field(ge=1)
    sha256: list[str]

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int) -> int:
        if v > MAX_CHUNK_SIZE:
            raise _too_large(f"chunk_size {v} exceeds {MAX_CHUNK_SIZE}")
        return v

    @field_validator("count")
    @classmethod
    def _chunk_count(cls, v: int) -> int:
        if v > MAX_CHUNKS:
            raise _too_large(f"{v} chunks exceed {MAX_CHUNKS}")
        return v

    @field_validator("sha256")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_CHUNKS:
            raise _too_large(f"{len(v)} chunk hashes exceed {MAX_CHUNKS}")
        for h in v:
            if not isinstance(h, str) or not _SHA256.fullmatch(h):
                raise ValueError(f"chunk hash {h[:70]!r} is not 64 lowercase hex digits")
        return v

    @model_validator(mode="after")
    def _count(self) -> ChunkInfo:
        if len(self.sha256) != self.count:
            raise ValueError(f"{len(self.sha256)} chunk hashes for count={self.count}")
        return self

    def chunk_length(self, n: int, size: int) -> int:
        """Exact length of chunk ``n`` of a ``size``-byte block (the last one may be short)."""
        if not 0 <= n < self.count:
            raise IndexError(f"chunk {n} outside 0..{self.count - 1}")
        return min(self.chunk_size, size - n * self.chunk_size)


class Targets(BaseModel):
    """Who should install the update: union of devices and profiles; both empty = all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[str] = []
    profiles: list[str] = []

    @field_validator("devices", "profiles")
    @classmethod
    def _bounded(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_TARGETS:
            raise _too_large(f"{len(v)} targets exceed {MAX_TARGETS}")
        return v

    @field_validator("devices")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        try:
            return [validate_id(d) for d in v]
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    @property
    def everyone(self) -> bool:
        return not self.devices and not self.profiles


class SliceAssignment(BaseModel):
    """Blocks ``first..last`` of the update's model for one device: the cut the trainer's
    re-planner chose for it (``cloud_trainer/plan/adaptive.py``); the cloud serves the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first: int = Field(ge=1)
    last: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self) -> SliceAssignment:
        if self.last < self.first:
            raise ValueError(f"last {self.last} < first {self.first}")
        return self


class Variant(BaseModel):
    """The full model for some firmware profiles; block files are named ``<sha256>.onnx``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profiles: list[str] = []  # empty: the default for any profile not listed elsewhere
    partition: PartitionManifest
    chunks: dict[str, ChunkInfo]

    @model_validator(mode="after")
    def _consistent(self) -> Variant:
        p = self.partition
        if len(p.blocks) > MAX_BLOCKS:
            raise _too_large(f"{len(p.blocks)} blocks exceed {MAX_BLOCKS}")
        if not p.is_complete:
            raise ValueError(f"a variant carries the whole model (blocks 1..{p.num_blocks}), "
                             f"got {p.first}..{p.last}")
        shas = {b.sha256 for b in p.blocks}
        if set(self.chunks) != shas:
            raise ValueError("chunks must list exactly the blocks' sha256s")
        for b in p.blocks:
            if b.size > MAX_BLOCK_SIZE:
                raise _too_large(f"block {b.index} declares {b.size} bytes (max {MAX_BLOCK_SIZE})")
            if b.file != f"{b.sha256}.onnx":
                raise ValueError(f"block {b.index} file must be '<sha256>.onnx', got {b.file!r}")
            info = self.chunks[b.sha256]
            if info.count != math.ceil(b.size / info.chunk_size):
                raise ValueError(f"block {b.index}: {info.count} chunks of {info.chunk_size} "
                                 f"bytes cannot hold {b.size} bytes")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in {b.sha256: b for b in self.partition.blocks}.values())


class UpdateManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    fleet: str
    model_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    version: int = Field(ge=1)  # == every variant's partition.model_version
    rollback: bool = False  # the only way a device accepts a version lower than its own
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    targets: Targets = Targets()
    variants: list[Variant]
    # per-device slices (a moved cut); a device not listed keeps the slice it runs
    assignments: dict[str, SliceAssignment] = {}

    @field_validator("assignments")
    @classmethod
    def _assignments(cls, v: dict[str, SliceAssignment]) -> dict[str, SliceAssignment]:
        if len(v) > MAX_TARGETS:
            raise _too_large(f"{len(v)} assignments exceed {MAX_TARGETS}")
        try:
            for device in v:
                validate_id(device)
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("fleet")
    @classmethod
    def _fleet(cls, v: str) -> str:
        try:
            return validate_id(v, "fleet id")
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[Variant]) -> list[Variant]:
        if not v:
            raise ValueError("an update needs at least one variant")
        if len(v) > MAX_VARIANTS:
            raise _too_large(f"{len(v)} variants exceed {MAX_VARIANTS}")
        seen: set[str] = set()
        tables: dict[str, ChunkInfo] = {}
        defaults = 0
        for variant in v:
            for sha, info in variant.chunks.items():
                if tables.setdefault(sha, info) != info:
                    raise ValueError(f"block {sha[:12]} is chunked differently in two variants")
            defaults += not variant.profiles
            dup = seen.intersection(variant.profiles)
            if dup:
                raise ValueError(f"profiles {sorted(dup)} appear in two variants")
            seen.update(variant.profiles)
        if defaults > 1:
            raise ValueError("at most one default variant (empty profiles)")
        return v

    @model_validator(mode="after")
    def _same_model(self) -> UpdateManifest:
        for variant in self.variants:
            p = variant.partition
            if p.model_id != self.model_id or p.model_version != self.version:
                raise ValueError(f"variant partition is {p.model_id} v{p.model_version}, "
                                 f"the update {self.model_id} v{self.version}")
            for device, a in self.assignments.items():
                if a.last > p.num_blocks:
                    raise ValueError(f"assignment for {device}: blocks {a.first}..{a.last} "
                                     f"of a {p.num_blocks}-block model")
        return self

    def targets_device(self, device: str, profile: str) -> bool:
        t = self.targets
        return t.everyone or device in t.devices or profile in t.profiles

    def variant_for(self, profile: str) -> Variant:
        """The variant listing ``profile``, else the default one; UpdateRejected otherwise."""
        default = None
        for variant in self.variants:
            if profile in variant.profiles:
                return variant
            if not variant.profiles:
                default = variant
        if default is None:
            raise UpdateRejected("no_variant", f"no variant for profile {profile!r}")
        return default

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))


class SignedManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: UpdateManifest
    key_id: str
    signature: str  # base64 of the 64-byte Ed25519 signature over manifest.canonical_bytes()

    def payload(self) -> bytes:
        """The MQTT payload (the manifest is dumped exactly as it was signed)."""
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":")).encode()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def unsigned_payload(manifest: UpdateManifest) -> bytes:
    """For development fleets only: devices accept it only with ``allow_unsigned=True``."""
    return json.dumps({"manifest": manifest.model_dump(mode="json")},
                      separators=(",", ":")).encode()


def _check_signature(doc: dict[str, Any], keys: Mapping[str, Any]) -> None:
    """``doc``'s signature (present) verifies with the configured key it names."""
    signature, kid = doc.get("signature"), doc.get("key_id")
    if not isinstance(signature, str) or not isinstance(kid, str):
        raise UpdateRejected("malformed", "key_id and signature must be strings")
    if not keys:
        raise UpdateRejected("unknown_key", "no update key is configured on this device")
    key = keys.get(kid)
    if key is None:
        raise UpdateRejected("unknown_key", f"key_id {kid[:32]!r} is not configured")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise UpdateRejected("bad_signature", "signature is not base64") from None
    if not verify(key, raw, canonical_json(doc["manifest"])):
        raise UpdateRejected("bad_signature", f"signature does not verify with {kid}")


def parse_signed(
    payload: bytes,
    public_keys: PublicKeys | None,
    *,
    max_bytes: int = MAX_MANIFEST_BYTES,
    allow_unsigned: bool = False,
    fleet: str | None = None,
) -> UpdateManifest:
    """Check size, then signature, then schema; return the manifest or raise UpdateRejected.

    With any key configured, only a manifest signed by one of those keys passes;
    ``allow_unsigned`` is honoured only when no key is configured (development).
    """
    if len(payload) > max_bytes:
        raise UpdateRejected("too_large", f"manifest of {len(payload)} bytes > {max_bytes}")
    try:
        # Depth and integer length bounded before parsing: a deeply nested manifest raised
        # RecursionError here, which the updater reported as ``internal`` and retried.
        doc = safejson.loads(payload, max_bytes=max_bytes, max_depth=MAX_MANIFEST_DEPTH)
    except safejson.UnsafeJSONError as exc:
        raise UpdateRejected("malformed", f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifest"), dict):
        raise UpdateRejected("malformed", "expected an object with a 'manifest' object")
    extra = set(doc) - {"manifest", "key_id", "signature"}
    if extra:
        raise UpdateRejected("malformed", f"unknown fields {sorted(extra)}")
    keys = as_key_map(public_keys or {})
    if doc.get("signature") is None:
        if keys or not allow_unsigned:
            raise UpdateRejected("unsigned", "the manifest carries no signature")
    else:
        _check_signature(doc, keys)
    manifest = validate_manifest(doc["manifest"])
    if fleet is not None and manifest.fleet != fleet:
        raise UpdateRejected("wrong_fleet", f"manifest for fleet {manifest.fleet!r}")
    return manifest


def validate_manifest(obj: Mapping[str, Any]) -> UpdateManifest:
    try:
        return UpdateManifest.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors()
        reason: Reason = (
            "too_large" if any(e["type"] in ("too_large", "too_long") for e in errors)
            else "malformed"
        )
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]
        )
        raise UpdateRejected(reason, detail) from None
