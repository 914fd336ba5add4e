"""Ed25519 verification for update manifests (the device side; signing lives in the trainer).

A device holds only public keys, several of them during a key rotation; a key is named by
its ``key_id`` (the first 16 hex digits of the sha256 of its raw 32 bytes), which the signed
manifest carries so the device picks the key without trying them all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Mapping, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import KnetAgentError

PublicKeys = Union[Mapping[str, Ed25519PublicKey], Iterable[Ed25519PublicKey]]


class SigningError(KnetAgentError, ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


def load_public_key(source: Path | str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text/bytes or from the path of a PEM file."""
    if isinstance(source, bytes):
        pem = source
    elif isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        pem = source.encode()
    else:
        try:
            pem = Path(source).read_bytes()
        except OSError as exc:
            raise SigningError(f"public key {source}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise SigningError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"update keys must be Ed25519, got {type(key).__name__}")
    return key


def load_public_keys(sources: Iterable[Path | str | bytes]) -> dict[str, Ed25519PublicKey]:
    """``{key_id: key}`` for every configured key (old and new during a rotation)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for source in sources:
        key = load_public_key(source)
        keys[key_id(key)] = key
    return keys


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:16]


def as_key_map(keys: PublicKeys) -> dict[str, Ed25519PublicKey]:
    """Accept either ``{key_id: key}`` or a plain list of keys."""
    if isinstance(keys, Mapping):
        return dict(keys)
    return {key_id(k): k for k in keys}


def verify(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
