"""The trainer's update signing key: generate, load, sign.

The private key never goes to a device; devices get the public PEM (several during a key
rotation: add the new public key to every device, start signing with the new private key,
then retire the old public key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.update.signing import SigningError, key_id
from agent.update.update_manifest import SignedManifest, UpdateManifest
from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)


class KeyExistsError(KnetTrainerError, SigningError, FileExistsError):
    """``generate_keypair`` found a key already there: it never overwrites one."""


def generate_keypair(directory: Path | str, name: str = "knet-update") -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, mode 0600) and ``<name>.pub``; never overwrite a key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyExistsError(f"{path} exists: refusing to overwrite an update key (every "
                                 "device trusts it); choose another --name or --dir")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL: losing a fleet's signing key to a typo would lock every device out of updates.
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created between the check and here
        raise KeyExistsError(f"{private_path} exists: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    log.info("update key %s written to %s (public: %s)", key_id(key.public_key()),
             private_path, public_path)
    return private_path, public_path


def secret_share_group(group: str, private_key: Ed25519PrivateKey) -> str:
    """The MQTT v5 shared-subscription group the trainer's replicas actually join.

    Mosquitto 2.0.11 grants any subscription (the ACL file is checked on delivery only), so
    a device could join ``$share/trainers/...``: the broker then hands it every other
    activation, refuses it delivery by the ACL, and the message is lost for the trainers.
    The name a replica joins is ``<group>-<HMAC of the group under the update signing
    key>``: every replica signs with the same key and derives the same name; a device never
    holds that key and cannot name the group.
    """
    raw = private_key.private_bytes(serialization.Encoding.Raw,
                                    serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    tag = hmac.new(raw, b"knet-share-group:" + group.encode(), hashlib.sha256).hexdigest()
    return f"{group[:42]}-{tag[:20]}"


def load_private_key(path: Path | str, password: bytes | None = None) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        pem = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SigningError(f"private key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("private key %s is readable by group/others (mode %o): chmod 600 it",
                    path, stat.S_IMODE(mode))
    try:
        key = serialization.load_pem_private_key(pem, password)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"private key {path} is {type(key).__name__}, not Ed25519")
    return key


def sign_manifest(manifest: UpdateManifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    signature = private_key.sign(manifest.canonical_bytes())
    return SignedManifest(manifest=manifest, key_id=key_id(private_key.public_key()),
                          signature=base64.b64encode(signature).decode())
