"""Provision many devices from a list file: ``knet broker provision --list FILE --dir D``.

Each device gets a bundle ``D/credentials/<id>/`` laid out as ``/etc/knet/`` on the device,
where the agent's unit (``agent/systemd/knet-agent.service``) expects it::

    agent.toml                 a complete agent config: [device], [model] profile, [mqtt],
                               [source] (frames on the device's MQTT input topic), [update]
    credentials/mqtt-password  0600; the unit hands it to the agent with LoadCredential=
    ca.crt                     the fleet CA, when the broker speaks TLS
    update.pub                 the update-signing public key, when one is given

The bundle directory is 0755 and its public files 0644, as on the device, where the unit's
dynamic user reads them; ``credentials/`` is 0700 (read by systemd as root).

Idempotent: a device already provisioned keeps its password (it is never rotated here:
``knet broker provision ID --fleet F`` does that). Its bundle's other files are rewritten
only where they differ from what the list and the options now say (a new profile, host, CA
or key): "updated"; otherwise "unchanged". A bundle that is no longer here (handed out to
the device) is left alone. New devices are "created". The password file, the ACL and the
registry are each replaced at most once, atomically, and only if their content changes; the
broker is reloaded only then.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.fsutil import atomic_write
from agent.update.signing import SigningError, load_public_key
from broker import certs as pki
from broker.devicelist import DeviceEntry
from broker.provision import (
    ACL_MODE,
    DEFAULT_PORT,
    DEFAULT_TLS_PORT,
    DEVICE_CONNECTIONS,
    FleetLayout,
    ProvisionError,
    _acl_text,
    _empty_registry,
    _load_registry,
    _locked,
    _now,
    _passwd_text,
    _read_passwd,
    _replace_if_changed,
    _save_registry,
    _toml_str,
    _usernames,
    create_certs,
    hash_password,
    init_fleet_dir,
    layout,
    reload_broker,
)

log = logging.getLogger(__name__)

Status = Literal["created", "updated", "unchanged"]
SECRET = Path("credentials") / "mqtt-password"  # relative to the bundle, as to /etc/knet
CREDENTIAL_NAME = "mqtt-password"  # the unit's LoadCredential=mqtt-password:...
MANIFEST = "/var/lib/knet/model/manifest.json"  # the unit's StateDirectory=knet
OPTIONAL_FILES = ("ca.crt", "update.pub")  # written when wanted, removed when not


@dataclass(frozen=True)
class BundleOptions:
    """What every device of one run dials and trusts."""

    host: str
    port: int
    prefix: str
    ca: bytes | None  # the fleet CA certificate: TLS
    update_key: bytes | None  # PEM public key: over-the-air updates enabled


@dataclass(frozen=True)
class DeviceOutcome:
    """What one run did for one listed device."""

    device: str
    fleet: str
    profile: str
    status: Status
    bundle: Path
    changed: tuple[str, ...] = ()  # files rewritten or removed, "profile" if re-recorded
    note: str = ""

    def describe(self) -> str:
        detail = f" ({', '.join(self.changed)})" if self.changed else ""
        note = f"; {self.note}" if self.note else ""
        return (f"{self.status:9} {self.device} (fleet {self.fleet}, profile {self.profile})"
                f"{detail} → {self.bundle}{note}")


@dataclass
class _Plan:
    """The registry and password entries as they will be written, built in memory."""

    reg: dict[str, Any]
    entries: dict[str, str]
    outcomes: list[DeviceOutcome] = field(default_factory=list)


def provision_list(
    directory: Path | str,
    devices: Sequence[DeviceEntry],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    tls: bool | None = None,
    update_key: Path | None = None,
    server_names: Iterable[str] = pki.DEFAULT_SERVER_NAMES,
    reload: bool = True,
) -> list[DeviceOutcome]:
    """Provision ``devices`` (validated by ``broker.devicelist``); one outcome per device.

    ``tls``: None means "if the fleet directory has a CA" (``knet broker certs``); True
    creates the CA and server certificate if missing. ``port`` defaults to 8883 with TLS,
    1883 without. Refused before anything is written (ProvisionError): an id that is a
    trainer account, a device of another fleet (revoke it first), an unreadable key.
    """
    lay = layout(directory)
    with _locked(lay):
        # Everything that can refuse the run comes before the first write.
        reg = _load_registry(lay) if lay.registry.exists() else _empty_registry("knet")
        _check_conflicts(reg, devices)
        options = _options(lay, reg, host, port, tls, update_key, server_names)
        new = [d for d in devices if d.id not in reg["devices"]]
        passwords = {d.id: secrets.token_urlsafe(24) for d in new}
        digests = {d: hash_password(d, pw) for d, pw in passwords.items()}
        init_fleet_dir(lay.root)
        reg = _load_registry(lay)
        plan = _Plan(copy.deepcopy(reg), _read_passwd(lay))
        for device in devices:
            if device.id in passwords:
                _create(lay, plan, device, options, passwords[device.id], digests[device.id])
            else:
                _refresh(lay, plan, device, options)
        broker_changed = _write_broker_files(lay, reg, plan)
    for outcome in plan.outcomes:
        log.info("%s", outcome.describe())
    if broker_changed and reload:
        reload_broker(lay.root)
    return plan.outcomes


def _check_conflicts(reg: dict[str, Any], devices: Sequence[DeviceEntry]) -> None:
    for device in devices:
        if device.id in reg["trainers"]:
            raise ProvisionError(f"{device.id!r} is a trainer account; device and trainer ids "
                                 "share the broker's username space: nothing provisioned")
        current = reg["devices"].get(device.id)
        if current and current["fleet"] != device.fleet:
            raise ProvisionError(f"device {device.id!r} belongs to fleet {current['fleet']!r}, "
                                 f"the list says {device.fleet!r}: revoke it before moving it "
                                 "to another fleet; nothing provisioned")


def _options(lay: FleetLayout, reg: dict[str, Any], host: str, port: int | None,
             tls: bool | None, update_key: Path | None,
             server_names: Iterable[str]) -> BundleOptions:
    ca_file = pki.ca_paths(lay.certs).cert
    key = _update_key(update_key) if update_key is not None else None
    use_tls = ca_file.exists() if tls is None else tls
    if use_tls:
        # Keeps an existing CA and server certificate; a new one also names ``host``.
        create_certs(lay.root, [*server_names, host])
        _check_server_name(lay, host)
    return BundleOptions(host=host, port=port or (DEFAULT_TLS_PORT if use_tls else DEFAULT_PORT),
                         prefix=reg["prefix"], ca=ca_file.read_bytes() if use_tls else None,
                         update_key=key)


def _update_key(path: Path) -> bytes:
    """The PEM of an Ed25519 public key, checked as the agent will load it."""
    try:
        pem = Path(path).read_bytes()
        load_public_key(pem)
    except (OSError, SigningError) as exc:
        raise ProvisionError(f"--update-key {path}: {exc} (the .pub of `knet keys gen`, never "
                             "the private key); nothing provisioned") from None
    return pem


def _check_server_name(lay: FleetLayout, host: str) -> None:
    """Devices verify the broker's host name: a certificate that does not name ``host``
    would fail every device's handshake."""
    names = pki.server_cert_names(lay.certs)
    try:
        wanted = str(ipaddress.ip_address(host))
    except ValueError:
        wanted = host.lower()
    if wanted not in [n.lower() for n in names]:
        raise ProvisionError(
            f"the broker's server certificate {lay.certs / 'server.crt'} is valid for "
            f"{', '.join(names) or 'no name'}, not {host!r}: devices would refuse it. Re-issue "
            f"it: knet broker certs --dir {lay.root} --renew-server "
            f"{' '.join(f'--name {n}' for n in dict.fromkeys([*names, host]))}; "
            "nothing provisioned")


# -- one device -----------------------------------------------------------------------------
def _create(lay: FleetLayout, plan: _Plan, device: DeviceEntry, options: BundleOptions,
            password: str, digest: str) -> None:
    bundle = lay.bundle(device.id)
    if bundle.exists():  # left by an interrupted run, or by a revoked namesake
        shutil.rmtree(bundle)
    (bundle / SECRET.parent).mkdir(parents=True, mode=0o700)
    # As /etc/knet must be on the device: the unit's dynamic user reads agent.toml there.
    # Here D/credentials (0700) keeps everyone else out.
    bundle.chmod(0o755)
    atomic_write(bundle / SECRET, password + "\n", 0o600)
    for name, data in _public_files(device, options).items():
        atomic_write(bundle / name, data, 0o644)
    connections = sorted(DEVICE_CONNECTIONS)
    for user in _usernames(device.id, connections):
        plan.entries[user] = digest
    plan.reg["devices"][device.id] = {
        "fleet": device.fleet, "profile": device.profile, "auth": "password", "serial": None,
        "created": _now(), "connections": connections,
    }
    plan.outcomes.append(DeviceOutcome(device.id, device.fleet, device.profile, "created",
                                       bundle))


def _refresh(lay: FleetLayout, plan: _Plan, device: DeviceEntry,
             options: BundleOptions) -> None:
    """An existing device: its secret stays; its record and bundle follow the list."""
    entry = plan.reg["devices"][device.id]
    changed: list[str] = []
    if entry.get("profile") != device.profile:
        entry["profile"] = device.profile
        changed.append("profile")
    bundle = lay.bundle(device.id)
    note = ""
    if (bundle / SECRET).is_file():
        changed += _sync_files(bundle, _public_files(device, options))
    else:
        note = ("its bundle is not here (handed out, or made by single provisioning): "
                "left as is")
    plan.outcomes.append(DeviceOutcome(device.id, device.fleet, device.profile,
                                       "updated" if changed else "unchanged", bundle,
                                       tuple(changed), note))


def _sync_files(bundle: Path, wanted: dict[str, bytes]) -> list[str]:
    """Make the bundle's public files exactly ``wanted``; the names it had to touch."""
    touched = []
    for name, data in wanted.items():
        path = bundle / name
        if not path.is_file() or path.read_bytes() != data:
            atomic_write(path, data, 0o644)
            touched.append(name)
    for name in OPTIONAL_FILES:
        if name not in wanted and (bundle / name).exists():
            (bundle / name).unlink()
            touched.append(f"-{name}")
    return touched


def _public_files(device: DeviceEntry, options: BundleOptions) -> dict[str, bytes]:
    files = {"agent.toml": agent_toml(device, options).encode()}
    if options.ca is not None:
        files["ca.crt"] = options.ca
    if options.update_key is not None:
        files["update.pub"] = options.update_key
    return files


def agent_toml(device: DeviceEntry, options: BundleOptions) -> str:
    """The device's complete agent.toml; the same inputs always give the same text."""
    lines = [
        f"# knet-agent config for device {device.id} (fleet {device.fleet}, profile "
        f"{device.profile}), from `knet broker provision --list`.",
        "# Install this directory as /etc/knet/ on the device: knet-agent.service reads",
        "# /etc/knet/agent.toml and hands credentials/mqtt-password to the agent as the",
        "# systemd credential mqtt-password. Relative paths resolve against this file's",
        "# directory. Every other setting: docs/examples/agent.toml in the knet sources.",
        "[device]",
        f"id = {_toml_str(device.id)}",
        f"fleet = {_toml_str(device.fleet)}",
        *([f"topic_prefix = {_toml_str(options.prefix)}"] if options.prefix != "knet" else []),
        "",
        "[model]",
        f"manifest = {_toml_str(MANIFEST)}",
        f"profile = {_toml_str(device.profile)}",
        "",
        "[mqtt]",
        f"host = {_toml_str(options.host)}",
        f"port = {options.port}",
        f"username = {_toml_str(device.id)}",
        f"password_credential = {_toml_str(CREDENTIAL_NAME)}",
        *(["", "[mqtt.tls]", 'ca_file = "ca.crt"'] if options.ca is not None else []),
        "",
        "[source]",
        'kind = "mqtt"   # frames on the device\'s input topic; or "images", "npz"',
    ]
    if options.update_key is not None:
        lines += ["", "[update]", "enabled = true", 'public_keys = ["update.pub"]']
    return "\n".join(lines) + "\n"


# -- the broker's files ------------------------------------------------------------------------
def _write_broker_files(lay: FleetLayout, before: dict[str, Any], plan: _Plan) -> bool:
    """Password file, then ACL, then registry: each replaced once if its content changed.
    Returns whether the broker must reload."""
    changed = _replace_if_changed(lay.passwd, _passwd_text(plan.entries))
    changed = _replace_if_changed(lay.acl, _acl_text(plan.reg), ACL_MODE) or changed
    if plan.reg != before:
        _save_registry(lay, plan.reg)
    return changed


__all__ = ["BundleOptions", "DeviceOutcome", "agent_toml", "provision_list"]
