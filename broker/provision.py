"""Fleet provisioning: credentials, the password and ACL files, and a broker built from them.

A fleet directory ``D`` holds everything one broker needs (one broker may serve many
fleets; a device id is a broker-wide username, so it belongs to exactly one fleet)::

    D/fleet.json          registry: devices (fleet, auth, cert serial), trainers, revocations
    D/passwd              Mosquitto password file: PBKDF2-SHA512 hashes only
    D/knet.acl            generated from the registry (broker/acl.py)
    D/certs/              development CA, server certificate, CRL (broker/certs.py)
    D/credentials/<id>/   the bundle to copy to the device: agent.toml snippet and either
                          mqtt.password (0600) or client.crt/client.key, plus ca.crt
    D/broker/             runtime of `knet broker run`: mosquitto.conf, persistence, log, pid

The clear password exists only in the returned ``Credentials`` and in the 0600 bundle file
meant for the device; move the bundle to the device and delete it here. Passwords are
hashed by ``mosquitto_passwd -U`` on a private temporary file rather than ``-b``, which would
show the password in the process list.

Every change rewrites files atomically (a broker reloading mid-write must never read half a
password file) under an exclusive lock on ``D/.lock``, and then signals a broker started by
``run_foreground`` on the same directory to reload (SIGHUP).

Entry points for the ``knet broker`` CLI: ``provision_device``, ``provision_trainer``,
``revoke_device``, ``revoke_accounts``, ``create_certs``, ``run_foreground``,
``fleet_settings``; many devices from a list file: ``broker/bulk.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write
from agent.wire.topics import Topics, connection_username, validate_id
from broker import certs as pki
from broker.acl import render_acl
from broker.config import BrokerSettings, TlsListener
from broker.errors import KnetBrokerError
from broker.launcher import BrokerError, Mosquitto

log = logging.getLogger(__name__)

REGISTRY_VERSION = 1
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_MTLS_PORT = 8884
# Every device's connections besides the agent's own: ``knet-agent benchmark --publish``
# runs beside the daemon and must not take over its session (agent/infer/blockbench.py).
DEVICE_CONNECTIONS = ("bench",)
# A trainer's connections besides its main one (cloud_trainer/service.py): each logs in as
# ``<trainer>.<connection>`` because the broker binds a session to its username.
TRAINER_CONNECTIONS = ("ingest", "split")
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
ACL_MODE = 0o644


class ProvisionError(KnetBrokerError, RuntimeError):
    """A provisioning request that cannot be carried out (bad id, clash, missing files)."""


@dataclass(frozen=True)
class FleetLayout:
    """Where everything lives in a fleet directory."""

    root: Path

    @property
    def registry(self) -> Path:
        return self.root / "fleet.json"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "knet.acl"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def pid_file(self) -> Path:
        return self.broker / "mosquitto.pid"

    @property
    def conf(self) -> Path:
        return self.broker / "mosquitto.conf"

    def bundle(self, account: str) -> Path:
        return self.credentials / account


@dataclass(frozen=True)
class Credentials:
    """What provisioning hands out once. ``password`` is the only copy outside the bundle."""

    username: str
    fleets: tuple[str, ...]
    kind: str  # "device" or "trainer"
    bundle: Path
    snippet: str  # TOML for the agent ([device] + [mqtt]) or the trainer ([trainer] + [mqtt])
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    cert_serial: int | None = None

    def __repr__(self) -> str:  # never print the secret by accident
        return (f"Credentials(username={self.username!r}, fleets={self.fleets!r}, "
                f"kind={self.kind!r}, bundle={str(self.bundle)!r}, "
                f"password={'***' if self.password else None})")


def layout(directory: Path | str) -> FleetLayout:
    return FleetLayout(Path(directory).resolve())


# -- registry and atomic files ------------------------------------------------------------
def _atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    atomic_write(path, text, mode)


def _empty_registry(prefix: str) -> dict[str, Any]:
    return {"version": REGISTRY_VERSION, "prefix": prefix, "devices": {}, "trainers": {},
            "revoked": []}


def init_fleet_dir(directory: Path | str, prefix: str = "knet") -> FleetLayout:
    """Create an empty fleet directory (idempotent); private to the invoking user."""
    lay = layout(directory)
    Topics("default", prefix)  # validates the prefix
    for d in (lay.root, lay.credentials):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
    if not lay.registry.exists():
        _atomic_write(lay.registry, json.dumps(_empty_registry(prefix), indent=2) + "\n")
    if not lay.passwd.exists():
        _atomic_write(lay.passwd, "")
    if not lay.acl.exists():
        _write_acl(lay, _load_registry(lay))
    return lay


def load_registry(directory: Path | str) -> dict[str, Any]:
    """The registry as plain data (devices, trainers, revoked); read-only use."""
    return _load_registry(layout(directory))


def _load_registry(lay: FleetLayout) -> dict[str, Any]:
    try:
        data = json.loads(lay.registry.read_text())
    except FileNotFoundError:
        raise ProvisionError(f"{lay.root} is not a fleet directory (no fleet.json)") from None
    if data.get("version") != REGISTRY_VERSION:
        raise ProvisionError(f"{lay.registry}: unsupported registry version "
                             f"{data.get('version')!r}")
    return dict(data)


def _registry_text(reg: dict[str, Any]) -> str:
    return json.dumps(reg, indent=2, sort_keys=True) + "\n"


def _save_registry(lay: FleetLayout, reg: dict[str, Any]) -> None:
    _atomic_write(lay.registry, _registry_text(reg))


def _replace_if_changed(path: Path, text: str, mode: int = 0o600) -> bool:
    """Atomically replace ``path`` with ``text`` unless it already holds exactly that."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    _atomic_write(path, text, mode)
    return True


@contextlib.contextmanager
def _locked(lay: FleetLayout) -> Iterator[None]:
    """Serialise provisioning runs on one directory (two shells, a script and the CLI)."""
    lay.root.mkdir(parents=True, exist_ok=True)
    with open(lay.root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _acl_text(reg: dict[str, Any]) -> str:
    devices = {d: e["fleet"] for d, e in reg["devices"].items()}
    trainers = {t: e["fleets"] for t, e in reg["trainers"].items()}
    upstreams = {d: e["upstream"] for d, e in reg["devices"].items()
                 if e.get("upstream") in devices}  # a revoked upstream loses the link
    connections = {a: list(e.get("connections", ()))
                   for kind in ("devices", "trainers") for a, e in reg[kind].items()}
    sites = {s: e["fleets"] for s, e in reg.get("sites", {}).items()}
    return render_acl(devices, trainers, reg["prefix"], upstreams, connections, sites)


def _write_acl(lay: FleetLayout, reg: dict[str, Any]) -> None:
    # 0644: Mosquitto may run as its own user; the ACL holds no secrets.
    _atomic_write(lay.acl, _acl_text(reg), ACL_MODE)


def _usernames(account: str, connections: Iterable[str]) -> list[str]:
    """Every broker username of an account: its own and one per extra connection."""
    return [account, *(connection_username(account, c) for c in connections)]


# -- password file -----------------------------------------------------------------------
def _read_passwd(lay: FleetLayout) -> dict[str, str]:
    entries: dict[str, str] = {}
    if lay.passwd.exists():
        for line in lay.passwd.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                user, _, digest = line.partition(":")
                entries[user] = digest
    return entries


def _passwd_text(entries: dict[str, str]) -> str:
    return "".join(f"{u}:{h}\n" for u, h in sorted(entries.items()))


def _write_passwd(lay: FleetLayout, entries: dict[str, str]) -> None:
    _atomic_write(lay.passwd, _passwd_text(entries))


def _mosquitto_passwd() -> str:
    path = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(path, os.X_OK):
        raise BrokerError("mosquitto_passwd not found: install the mosquitto package")
    return path


def hash_password(username: str, password: str) -> str:
    """Mosquitto's hash (``$7$``: PBKDF2-SHA512) of ``password``, computed by mosquitto_passwd.

    The clear text goes through a 0600 file in a private temporary directory, never argv.
    """
    if not password or any(c in password for c in "\r\n\0"):
        raise ProvisionError("a password must be non-empty and on one line")
    with tempfile.TemporaryDirectory(prefix="knet-passwd-") as tmp:
        plain = Path(tmp) / "passwd"
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{username}:{password}\n")
        proc = subprocess.run([_mosquitto_passwd(), "-U", str(plain)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise BrokerError(f"mosquitto_passwd -U failed: {proc.stderr.strip()}")
        user, _, digest = plain.read_text().strip().partition(":")
    if user != username or not digest.startswith("$"):
        raise BrokerError("mosquitto_passwd -U produced an unexpected line")
    return digest


# -- credentials bundle -------------------------------------------------------------------
def _toml_str(value: str) -> str:
    return json.dumps(value)  # a TOML basic string for the characters ids and paths use


def _mqtt_toml(username: str, host: str, port: int, password_file: str | None,
               tls: dict[str, str] | None) -> list[str]:
    lines = ["[mqtt]", f"host = {_toml_str(host)}", f"port = {port}",
             f"username = {_toml_str(username)}"]
    if password_file:
        lines.append(f"password_file = {_toml_str(password_file)}")
    if tls:
        lines += ["", "[mqtt.tls]", *(f"{k} = {_toml_str(v)}" for k, v in tls.items())]
    return lines


@dataclass(frozen=True)
class _Secret:
    password: str | None
    password_file: Path | None
    ca_file: Path | None
    cert: pki.CertPaths | None
    tls: dict[str, str] | None
    connection_serials: dict[str, str] | None = None


def _issue_secret(lay: FleetLayout, reg: dict[str, Any], account: str, *,
                  password: str | None, cert: bool, tls: bool,
                  server_names: Iterable[str], connections: Iterable[str] = ()) -> _Secret:
    """Fresh credentials for ``account`` in its bundle; the previous ones stop working.

    Each extra connection gets its own username ``<account>.<connection>``: with a password
    the same secret (one hash, several lines of the password file), with certificates its
    own certificate (CN = that username) in ``<bundle>/<connection>/``.
    """
    connections = list(connections)
    if cert and password is not None:
        raise ProvisionError("a certificate account has no password: the certificate is "
                             "its identity on the client-certificate listener")
    bundle = lay.bundle(account)
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True, mode=0o700)
    entries = _read_passwd(lay)
    old = reg["devices"].get(account) or reg["trainers"].get(account) or {}
    for serial in [old.get("serial"), *old.get("connection_serials", {}).values()]:
        if serial:  # rotating a certificate: the old one goes on the CRL
            pki.revoke_cert(lay.certs, int(serial, 16))
    for user in _usernames(account, old.get("connections", ())):
        entries.pop(user, None)
    ca_file: Path | None = None
    tls_section: dict[str, str] | None = None
    if cert or tls:
        create_certs(lay.root, server_names)
        ca_file = bundle / "ca.crt"
        shutil.copyfile(pki.ca_paths(lay.certs).cert, ca_file)
        tls_section = {"ca_file": ca_file.name}
    if cert:
        paths = pki.create_client_cert(lay.certs, account, bundle)
        extra = {c: pki.create_client_cert(lay.certs, connection_username(account, c),
                                           bundle / c) for c in connections}
        # No password: on the mTLS listener the certificate is the identity, and a leftover
        # password would let the account in on the password listeners too.
        _write_passwd(lay, entries)
        assert tls_section is not None
        tls_section.update(cert_file=paths.cert.name, key_file=paths.key.name)
        return _Secret(None, None, ca_file, paths, tls_section,
                       {c: f"{p.serial:x}" for c, p in extra.items()})
    clear = password if password is not None else secrets.token_urlsafe(24)
    digest = hash_password(account, clear)  # a $7$ hash does not depend on the username
    for user in _usernames(account, connections):
        entries[user] = digest
    _write_passwd(lay, entries)
    pw_file = bundle / "mqtt.password"
    _atomic_write(pw_file, clear + "\n", 0o600)
    return _Secret(clear, pw_file, ca_file, None, tls_section)


def _default_port(cert: bool, tls: bool) -> int:
    return DEFAULT_MTLS_PORT if cert else DEFAULT_TLS_PORT if tls else DEFAULT_PORT


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def provision_device(
    directory: Path | str,
    device: str,
    fleet: str,
    *,
    password: str | None = None,
    cert: bool = False,
    tls: bool | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    server_names: Iterable[str] = pki.DEFAULT_SERVER_NAMES,
    reload: bool = True,
    upstream: str | None = None,
    connections: Iterable[str] | None = None,
) -> Credentials:
    """Create (or rotate) a device's credentials and regenerate the ACL.

    ``upstream``: this device is a later stage of a chain and may read that device's
    ``chain`` topic (``""`` removes the link; None keeps what the registry says).
    ``connections``: names of extra simultaneous connections (e.g. ``["camera"]``), each
    logging in as ``<device>.<name>`` with the device's rights; the broker binds a session
    to its username, so a second connection under the device's own name would take over
    the agent's session (None keeps what the registry says).

    ``knet broker provision DEVICE --fleet F --dir D [--cert]`` prints ``.snippet``.

    Password devices get a generated password (``secrets``), or ``password``; certificate
    devices (``cert=True``) a client certificate with CN = device id for the mTLS listener.
    ``tls`` (default: ``cert``) adds ``[mqtt.tls]`` with the fleet CA to the snippet; ``host``
    and ``port`` are what the device dials (default port 1883, 8883 with tls, 8884 with
    cert). Provisioning an existing device again rotates its credentials; moving it to
    another fleet needs ``revoke_device`` first, so a fleet change is never silent.
    ``reload`` signals a broker run by ``run_foreground`` on this directory.
    """
    validate_id(device)
    validate_id(fleet, "fleet id")
    use_tls = cert if tls is None else (tls or cert)
    lay = init_fleet_dir(directory)
    with _locked(lay):
        reg = _load_registry(lay)
        if device in reg["trainers"]:
            raise ProvisionError(f"{device!r} is a trainer account; device and trainer ids "
                                 "share the broker's username space")
        current = reg["devices"].get(device)
        if current and current["fleet"] != fleet:
            raise ProvisionError(f"device {device!r} belongs to fleet {current['fleet']!r}: "
                                 "revoke it before provisioning it into another fleet")
        if upstream:
            validate_id(upstream, "upstream device id")
            up = reg["devices"].get(upstream)
            if up is None or up["fleet"] != fleet or upstream == device:
                raise ProvisionError(f"upstream {upstream!r} is not another device of fleet "
                                     f"{fleet!r}: provision it first")
        conns = sorted(set((current or {}).get("connections", ()) if connections is None
                           else (validate_id(c, "connection name") for c in connections))
                       | set(DEVICE_CONNECTIONS))
        secret = _issue_secret(lay, reg, device, password=password, cert=cert, tls=use_tls,
                               server_names=server_names, connections=conns)
        link = (current or {}).get("upstream") if upstream is None else (upstream or None)
        reg["devices"][device] = {
            "fleet": fleet,
            "auth": "cert" if cert else "password",
            "serial": f"{secret.cert.serial:x}" if secret.cert else None,
            "created": _now(),
            **({"upstream": link} if link else {}),
            **({"connections": conns} if conns else {}),
            **({"connection_serials": secret.connection_serials}
               if secret.connection_serials else {}),
        }
        _save_registry(lay, reg)
        _write_acl(lay, reg)
        prefix = reg["prefix"]
    chosen_port = port or _default_port(cert, use_tls)
    head = [
        f"# knet agent settings for device {device} (fleet {fleet}), from `knet broker "
        "provision`.",
        "# Copy this directory to the device (e.g. /etc/knet/) and merge these sections into",
        "# agent.toml there: relative paths resolve against the config file's directory.",
        "[device]",
        f"id = {_toml_str(device)}",
        f"fleet = {_toml_str(fleet)}",
        *([f"topic_prefix = {_toml_str(prefix)}"] if prefix != "knet" else []),
        "",
    ]
    snippet = "\n".join([*head, *_mqtt_toml(
        device, host, chosen_port, secret.password_file.name if secret.password_file else None,
        secret.tls)]) + "\n"
    return _finish(lay, device, (fleet,), "device", snippet, secret, reload)


def fleet_ids(fleets: str | Iterable[str], who: str) -> list[str]:
    """One fleet id or several, sorted and deduplicated; each a valid id, at least one."""
    fleet_list = sorted({fleets} if isinstance(fleets, str) else set(fleets))
    if not fleet_list:
        raise ProvisionError(f"{who} needs at least one fleet")
    for fleet in fleet_list:
        validate_id(fleet, "fleet id")
    return fleet_list


def provision_trainer(
    directory: Path | str,
    trainer_id: str,
    fleets: str | Iterable[str],
    *,
    password: str | None = None,
    cert: bool = False,
    tls: bool | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    server_names: Iterable[str] = pki.DEFAULT_SERVER_NAMES,
    reload: bool = True,
) -> Credentials:
    """Create (or rotate) a trainer account serving ``fleets``; same options as devices.

    The ACL lets it read every device's uplink in those fleets (also through
    ``$share/<group>/...``), publish manifests, blobs and split-inference replies, and own
    ``{prefix}/v1/trainer/<id>/state``. Provisioning it again replaces its fleet list.
    """
    validate_id(trainer_id, "trainer id")
    fleet_list = fleet_ids(fleets, "a trainer")
    use_tls = cert if tls is None else (tls or cert)
    lay = init_fleet_dir(directory)
    with _locked(lay):
        reg = _load_registry(lay)
        if trainer_id in reg["devices"]:
            raise ProvisionError(f"{trainer_id!r} is a device account; device and trainer "
                                 "ids share the broker's username space")
        secret = _issue_secret(lay, reg, trainer_id, password=password, cert=cert,
                               tls=use_tls, server_names=server_names,
                               connections=TRAINER_CONNECTIONS)
        reg["trainers"][trainer_id] = {
            "fleets": fleet_list,
            "auth": "cert" if cert else "password",
            "serial": f"{secret.cert.serial:x}" if secret.cert else None,
            "created": _now(),
            "connections": list(TRAINER_CONNECTIONS),
            **({"connection_serials": secret.connection_serials}
               if secret.connection_serials else {}),
        }
        _save_registry(lay, reg)
        _write_acl(lay, reg)
        prefix = reg["prefix"]
    # One knet-trainer serves one fleet ([trainer] fleet); an account for several fleets
    # runs one trainer.toml per fleet, each with this [mqtt] section.
    others = fleet_list[1:]
    head = [
        f"# knet trainer settings for {trainer_id}, from `knet broker provision --trainer`.",
        "# Merge into trainer.toml (it also needs [trainer] signing_key_file and [models]);",
        "# relative paths resolve against the config file's directory.",
        *([f"# This account also serves {', '.join(others)}: copy this file per fleet and "
           "change [trainer] fleet."] if others else []),
        "[trainer]",
        f"id = {_toml_str(trainer_id)}",
        f"fleet = {_toml_str(fleet_list[0])}",
        f"topic_prefix = {_toml_str(prefix)}",
        "",
    ]
    mqtt_lines = _mqtt_toml(trainer_id, host, port or _default_port(cert, use_tls),
                            secret.password_file.name if secret.password_file else None,
                            secret.tls)
    # The ingest and split connections log in as <id>.ingest / <id>.split (and, with a
    # certificate, use <bundle>/<connection>/client.crt): the broker binds sessions to names.
    mqtt_lines.insert(mqtt_lines.index("[mqtt]") + 1, "connection_accounts = true")
    snippet = "\n".join([*head, *mqtt_lines]) + "\n"
    return _finish(lay, trainer_id, tuple(fleet_list), "trainer", snippet, secret, reload)


def _finish(lay: FleetLayout, account: str, fleets: tuple[str, ...], kind: str, snippet: str,
            secret: _Secret, reload: bool) -> Credentials:
    bundle = lay.bundle(account)
    (bundle / ("agent.toml" if kind == "device" else "trainer.toml")).write_text(snippet)
    log.info("provisioned %s %s (%s) → %s", kind, account,
             "certificate" if secret.cert else "password", bundle)
    if reload:
        reload_broker(lay.root)
    return Credentials(
        username=account, fleets=fleets, kind=kind, bundle=bundle, snippet=snippet,
        password=secret.password, password_file=secret.password_file, ca_file=secret.ca_file,
        cert_file=secret.cert.cert if secret.cert else None,
        key_file=secret.cert.key if secret.cert else None,
        cert_serial=secret.cert.serial if secret.cert else None,
    )


class UnknownAccountError(ProvisionError):
    """Revocation named accounts this fleet directory never provisioned."""


@dataclass(frozen=True)
class Revocation:
    """What ``revoke_accounts`` did to one account."""

    account: str
    kind: str  # "device" or "trainer"
    revoked: bool  # False: it was revoked before (a re-run changes nothing)


def revoke_device(directory: Path | str, device: str, *, reload: bool = True) -> bool:
    """Revoke an account (device, or trainer): ``knet broker revoke DEVICE --dir D``.

    Removes its password hash, its ACL entries and its credential bundle, and puts its
    certificate on the CRL; returns False if no such account is provisioned (never was, or
    revoked already). After the reload (SIGHUP) the broker refuses the password and
    disconnects the account if it is connected; a revoked *certificate* still completes
    the TLS handshake until the broker restarts (Mosquitto reads the CRL at start-up only),
    but with no ACL entries it can neither publish nor subscribe to anything.
    """
    try:
        (done,) = revoke_accounts(directory, [device], reload=reload)
    except UnknownAccountError:
        log.warning("revoke: no account %r in %s", device, layout(directory).root)
        return False
    return done.revoked


def revoke_accounts(directory: Path | str, accounts: Iterable[str], *,
                    fleets: dict[str, str] | None = None,
                    reload: bool = True) -> list[Revocation]:
    """Revoke many accounts at once: ``knet broker revoke ID... | --list FILE --dir D``.

    All or nothing: an id that was never provisioned, or whose fleet is not the one
    ``fleets`` (id → fleet, from a device list) says, raises before anything changes.
    An id revoked before is reported as such. The password file, the CRL, the ACL and the
    registry are each replaced once, atomically, whatever the number of accounts, and the
    broker is signalled once: after that reload it refuses every one of them and keeps
    every other connection.
    """
    lay = layout(directory)
    wanted = list(dict.fromkeys(accounts))
    with _locked(lay):
        reg = _load_registry(lay)
        _check_revocable(lay, reg, wanted, fleets or {})
        entries = _read_passwd(lay)
        serials: set[int] = set()
        done = [_drop_account(reg, entries, serials, account) for account in wanted]
        revoked = [r.account for r in done if r.revoked]
        if revoked:
            # The secrets first: once the password file and the CRL are replaced, a crash
            # before the registry is written leaves the account refused, and a re-run of
            # the same revocation completes it.
            _replace_if_changed(lay.passwd, _passwd_text(entries))
            if serials:
                pki.write_crl(lay.certs, pki.revoked_serials(lay.certs) | serials)
                log.info("certificates %s are on the CRL %s",
                         ", ".join(f"{s:x}" for s in sorted(serials)),
                         pki.ca_paths(lay.certs).crl)
            _replace_if_changed(lay.acl, _acl_text(reg), ACL_MODE)
            _save_registry(lay, reg)
            for account in revoked:
                shutil.rmtree(lay.bundle(account), ignore_errors=True)
    for r in done:
        log.info("%s %s %s", "revoked" if r.revoked else "already revoked:", r.kind, r.account)
    if revoked and reload:
        reload_broker(lay.root)
    return done


def _check_revocable(lay: FleetLayout, reg: dict[str, Any], accounts: list[str],
                     fleets: dict[str, str]) -> None:
    gone = {r["id"] for r in reg["revoked"]}
    unknown = [a for a in accounts if a not in reg["devices"] and a not in reg["trainers"]
               and a not in reg.get("sites", {}) and a not in gone]
    if unknown:
        raise UnknownAccountError(f"no account {', '.join(map(repr, unknown))} in "
                                  f"{lay.root}: nothing revoked")
    for account, fleet in fleets.items():
        actual = reg["devices"].get(account, {}).get("fleet")
        if actual is not None and actual != fleet:
            raise ProvisionError(f"device {account!r} belongs to fleet {actual!r}, the list "
                                 f"says {fleet!r}: nothing revoked")


def _drop_account(reg: dict[str, Any], entries: dict[str, str], serials: set[int],
                  account: str) -> Revocation:
    """Take ``account`` out of the registry and the password entries (in memory)."""
    kind = next((k for k in ("devices", "trainers", "sites") if account in reg.get(k, {})),
                "trainers")
    entry = reg.setdefault(kind, {}).pop(account, None)
    if entry is None:
        last = [r for r in reg["revoked"] if r["id"] == account][-1]
        return Revocation(account, last["kind"], revoked=False)
    for user in _usernames(account, entry.get("connections", ())):
        entries.pop(user, None)
    for serial in [entry.get("serial"), *entry.get("connection_serials", {}).values()]:
        if serial:
            serials.add(int(serial, 16))
    reg["revoked"].append({"id": account, "kind": kind[:-1], "serial": entry.get("serial"),
                           "fleet": entry.get("fleet"), "revoked": _now()})
    return Revocation(account, kind[:-1], revoked=True)


# -- certificates ---------------------------------------------------------------------------
def create_certs(directory: Path | str,
                 server_names: Iterable[str] = pki.DEFAULT_SERVER_NAMES,
                 *, renew_server: bool = False) -> dict[str, Path]:
    """``knet broker certs --dir D``: the development CA, CRL and server certificate.

    Existing files are kept (a new CA would orphan every issued client certificate);
    ``renew_server`` re-issues the server certificate, e.g. for new host names.
    """
    lay = layout(directory)
    lay.certs.mkdir(parents=True, exist_ok=True)
    ca = pki.create_ca(lay.certs)
    server = pki.create_server_cert(lay.certs, server_names, overwrite=renew_server)
    return {"ca": ca.cert, "crl": ca.crl, "server_cert": server.cert, "server_key": server.key}


# -- broker settings and the foreground runner -------------------------------------------
def settings_for_layout(
    lay: FleetLayout,
    port: int,
    tls_port: int | None = None,
    mtls_port: int | None = None,
    *,
    bind_address: str = "127.0.0.1",
    tls_bind_address: str = "127.0.0.1",
) -> BrokerSettings:
    """Settings for a fleet directory without touching the disk (templates use it)."""
    ca = pki.ca_paths(lay.certs)

    def listener(p: int, mutual: bool) -> TlsListener:
        return TlsListener(port=p, bind_address=tls_bind_address, cafile=ca.cert,
                           certfile=lay.certs / "server.crt", keyfile=lay.certs / "server.key",
                           crlfile=ca.crl if mutual else None, require_certificate=mutual,
                           use_identity_as_username=mutual)

    return BrokerSettings(
        port=port,
        bind_address=bind_address,
        allow_anonymous=False,
        password_file=lay.passwd,
        acl_file=lay.acl,
        persistence=True,
        persistence_location=lay.broker / "data",
        log_file=lay.broker / "mosquitto.log",
        tls=listener(tls_port, False) if tls_port else None,
        mtls=listener(mtls_port, True) if mtls_port else None,
        username_as_clientid=True,
    )


def fleet_settings(
    directory: Path | str,
    port: int,
    tls_port: int | None = None,
    mtls_port: int | None = None,
    *,
    bind_address: str = "127.0.0.1",
    tls_bind_address: str = "127.0.0.1",
) -> BrokerSettings:
    """``BrokerSettings`` for a provisioned directory: its password, ACL and certificates.

    The plain listener stays on loopback unless ``bind_address`` says otherwise; the TLS
    listeners too (``tls_bind_address="0.0.0.0"`` to serve devices on the network).
    ``tls_port``: server-certificate TLS, password logins; ``mtls_port``: client
    certificates, CN = username.
    """
    lay = layout(directory)
    if not lay.registry.exists():
        raise ProvisionError(f"{lay.root} is not a fleet directory: provision a device first")
    if (tls_port or mtls_port) and not (lay.certs / "server.crt").exists():
        raise ProvisionError(f"no server certificate in {lay.certs}: run `knet broker certs`")
    settings = settings_for_layout(lay, port, tls_port, mtls_port, bind_address=bind_address,
                                   tls_bind_address=tls_bind_address)
    from broker.site import site_bridge_settings

    return site_bridge_settings(lay.root, settings)  # a site directory adds its bridge


def reload_broker(directory: Path | str) -> bool:
    """SIGHUP the broker ``run_foreground`` started on this directory, if it is running.

    The PID comes from ``D/broker/mosquitto.pid`` and is trusted only if that process is a
    mosquitto running this directory's config, so a stale PID file never signals a
    stranger. Returns whether a broker was signalled.
    """
    lay = layout(directory)
    try:
        pid = int(lay.pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    if b"mosquitto" not in os.path.basename(cmdline[0]) \
            or os.fsencode(str(lay.conf)) not in cmdline:
        log.warning("%s names pid %d, which is not this fleet's mosquitto: not signalled",
                    lay.pid_file, pid)
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    log.info("broker pid %d reloads the password and ACL files", pid)
    return True


def run_foreground(
    directory: Path | str,
    port: int,
    tls_port: int | None = None,
    mtls_port: int | None = None,
    *,
    bind_address: str = "127.0.0.1",
    tls_bind_address: str = "127.0.0.1",
    ready: threading.Event | None = None,
) -> int:
    """``knet broker run --dir D --port P [--tls-port T] [--mtls-port M]``.

    Starts a private Mosquitto with the directory's config and blocks until SIGINT or
    SIGTERM, then stops it by its PID; SIGHUP is passed on as a reload. Returns 0, or the
    broker's exit status if it died by itself. Call from the main thread (signal handlers).
    """
    lay = layout(directory)
    settings = fleet_settings(lay.root, port, tls_port, mtls_port, bind_address=bind_address,
                              tls_bind_address=tls_bind_address)
    stop, hup = threading.Event(), threading.Event()

    def on_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the broker", signum)
        stop.set()

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
        signal.SIGHUP: signal.signal(signal.SIGHUP, lambda *_: hup.set()),
    }
    try:
        with Mosquitto(lay.broker, settings) as broker:
            assert broker.pid is not None
            _atomic_write(lay.pid_file, f"{broker.pid}\n", 0o644)
            listeners = [f"{settings.bind_address}:{port}"] + [
                f"{t.bind_address}:{t.port} ({'mTLS' if t.require_certificate else 'TLS'})"
                for t in (settings.tls, settings.mtls) if t]
            log.info("mosquitto pid %d on %s; log %s", broker.pid, ", ".join(listeners),
                     settings.log_file)
            if ready is not None:
                ready.set()
            while not stop.is_set():
                rc = broker.wait(0.2)
                if rc is not None:
                    log.error("mosquitto exited with status %d; see %s", rc, settings.log_file)
                    return rc or 1
                if hup.is_set():
                    hup.clear()
                    broker.reload()
        return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            lay.pid_file.unlink()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- checked-in templates -------------------------------------------------------------------
EXAMPLE_DIR = Path("/etc/knet/broker")
EXAMPLE_STATE = Path("/var/lib/knet/broker")
EXAMPLE_DEVICES = {"cam-01": "lab", "cam-02": "lab", "gate-01": "yard"}
EXAMPLE_TRAINERS = {"trainer-1": ["lab", "yard"]}


def template_texts() -> dict[str, str]:
    """The files under broker/templates/, rendered from the documented settings.

    dev: one loopback listener, passwords, ACL, persistence. tls: the loopback listener
    (a trainer on the broker's host) plus TLS on 8883 and client-certificate TLS on 8884
    on all interfaces. Paths assume ``D = /etc/knet/broker`` and state in
    ``/var/lib/knet/broker``; Debian's mosquitto runs as user ``mosquitto``, which must be
    able to read D's files.
    """
    lay = FleetLayout(EXAMPLE_DIR)
    system = {"persistence_location": EXAMPLE_STATE, "log_file": None}
    dev = settings_for_layout(lay, DEFAULT_PORT).model_copy(update=system)
    tls = settings_for_layout(lay, DEFAULT_PORT, DEFAULT_TLS_PORT, DEFAULT_MTLS_PORT,
                              tls_bind_address="0.0.0.0").model_copy(update=system)
    return {
        "mosquitto.dev.conf": dev.render(),
        "mosquitto.tls.conf": tls.render(),
        "knet.acl": render_acl(EXAMPLE_DEVICES, EXAMPLE_TRAINERS,
                               connections={t: TRAINER_CONNECTIONS for t in EXAMPLE_TRAINERS}),
    }


def write_templates(dest: Path = TEMPLATE_DIR) -> list[Path]:
    """Regenerate broker/templates/ (``python -m broker.provision``)."""
    written = []
    for name, text in template_texts().items():
        path = Path(dest) / name
        path.write_text(text)
        written.append(path)
    return written


__all__ = [
    "Credentials", "FleetLayout", "ProvisionError", "Revocation", "UnknownAccountError",
    "create_certs",
    "fleet_settings", "init_fleet_dir", "layout", "load_registry", "provision_device",
    "provision_trainer", "reload_broker", "revoke_accounts", "revoke_device", "run_foreground",
    "settings_for_layout", "template_texts", "write_templates",
]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for p in write_templates():
        log.info("wrote %s", p)
