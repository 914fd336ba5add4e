"""A development PKI for the broker's TLS listeners, built with ``cryptography``.

One CA per fleet directory signs the broker's server certificate (SANs for the names and
addresses devices dial) and one client certificate per device whose CN is the device id, so
Mosquitto's ``use_identity_as_username`` turns the certificate into the ACL username.
The CA also issues the CRL the mTLS listener checks: revoking a certificate adds its serial.

This is a development CA: the key sits unencrypted (mode 0600) next to the certificates.
A production fleet should keep the CA key offline or use its own PKI; the broker only needs
``ca.crt``, ``server.crt``/``server.key`` and ``crl.pem``.

Layout of ``certs_dir``::

    ca.crt  ca.key  server.crt  server.key  crl.pem  clients/<id>.crt
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import KnetBrokerError

log = logging.getLogger(__name__)

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity common TLS stacks accept for a leaf
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


class CertError(KnetBrokerError, RuntimeError):
    """A certificate could not be created, loaded or revoked."""


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path
    serial: int


@dataclass(frozen=True)
class CaPaths:
    cert: Path
    key: Path
    crl: Path


def ca_paths(certs_dir: Path) -> CaPaths:
    d = Path(certs_dir)
    return CaPaths(d / "ca.crt", d / "ca.key", d / "crl.pem")


def _now() -> dt.datetime:
    # Backdated a little so a device whose clock lags by minutes still accepts the cert.
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def _not_after(cert: x509.Certificate) -> dt.datetime:
    # not_valid_after_utc appeared in cryptography 42; the project allows 41.
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: accepted by every OpenSSL/mbedTLS a device is likely to run, small and fast.
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (never world-readable, even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(certs_dir: Path, common_name: str = "knet development CA",
              *, overwrite: bool = False) -> CaPaths:
    """Create the CA key, self-signed certificate and an empty CRL (kept if present).

    Overwriting a CA invalidates every certificate it issued, so it needs ``overwrite``.
    """
    d = Path(certs_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = ca_paths(d)
    if paths.cert.exists() and paths.key.exists() and not overwrite:
        if not paths.crl.exists():
            write_crl(d, ())
        return paths
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(paths.key, _key_pem(key))
    _write_public(paths.cert, _cert_pem(cert))
    paths.crl.unlink(missing_ok=True)
    write_crl(d, ())
    log.info("created CA %s", paths.cert)
    return paths


def _load_ca(certs_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(certs_dir)
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"no CA in {certs_dir}: run create_ca (`knet broker certs`) first") \
            from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{paths.key}: expected an EC private key")
    return cert, key


def _issue(certs_dir: Path, common_name: str, sans: list[x509.GeneralName],
           usage: x509.ObjectIdentifier, cert_path: Path, key_path: Path) -> CertPaths:
    ca_cert, ca_key = _load_ca(certs_dir)
    key = _new_key()
    start = _now()
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=LEAF_DAYS),
                             _not_after(ca_cert)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        # The purpose is enforced by OpenSSL: a server certificate cannot log in as a client.
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, _cert_pem(cert))
    return CertPaths(cert_path, key_path, serial)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def create_server_cert(certs_dir: Path, names: Iterable[str] = DEFAULT_SERVER_NAMES,
                       *, overwrite: bool = False) -> CertPaths:
    """The broker's certificate, with a SAN for every host name and IP clients dial.

    Clients verify the host name (paho does by default), so a missing SAN fails the
    handshake: pass every name and address the devices use.
    """
    d = Path(certs_dir)
    cert_path, key_path = d / "server.crt", d / "server.key"
    if cert_path.exists() and key_path.exists() and not overwrite:
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        return CertPaths(cert_path, key_path, serial)
    names = list(dict.fromkeys(names))
    if not names:
        raise CertError("a server certificate needs at least one host name or address")
    paths = _issue(d, names[0], [_san(n) for n in names], ExtendedKeyUsageOID.SERVER_AUTH,
                   cert_path, key_path)
    log.info("created server certificate %s for %s", cert_path, ", ".join(names))
    return paths


def server_cert_names(certs_dir: Path) -> list[str]:
    """The host names and addresses the broker's server certificate is valid for."""
    cert = x509.load_pem_x509_certificate((Path(certs_dir) / "server.crt").read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(a) for a in san.get_values_for_type(x509.IPAddress)]


def create_client_cert(certs_dir: Path, common_name: str, out_dir: Path) -> CertPaths:
    """A client certificate with CN = the device (or trainer) id, key in ``out_dir``.

    A public copy of the certificate stays in ``certs_dir/clients/`` so it can be revoked
    later by serial even after the device's bundle has left this machine.
    """
    out = Path(out_dir)
    paths = _issue(Path(certs_dir), common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH,
                   out / "client.crt", out / "client.key")
    _write_public(Path(certs_dir) / "clients" / f"{common_name}.crt", paths.cert.read_bytes())
    log.info("issued client certificate CN=%s serial %x", common_name, paths.serial)
    return paths


def revoked_serials(certs_dir: Path) -> set[int]:
    crl_path = ca_paths(certs_dir).crl
    if not crl_path.exists():
        return set()
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    return {entry.serial_number for entry in crl}


def write_crl(certs_dir: Path, serials: Iterable[int]) -> Path:
    """(Re)write the CRL listing ``serials``, signed by the CA.

    next_update is the CA's own expiry: OpenSSL rejects every client once a CRL expires, and
    a development fleet should not lock itself out because nobody re-signed a CRL.
    """
    ca_cert, ca_key = _load_ca(certs_dir)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(_not_after(ca_cert))
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    path = ca_paths(certs_dir).crl
    _write_public(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def revoke_cert(certs_dir: Path, serial: int) -> Path:
    """Add ``serial`` to the CRL; Mosquitto 2.0.11 re-reads it on SIGHUP (and at start)."""
    return write_crl(certs_dir, revoked_serials(certs_dir) | {serial})


def cert_serial(path: Path) -> int:
    return int(x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number)
