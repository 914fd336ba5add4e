"""Site brokers bridged to the cloud: `knet broker provision-site SITE`.

A site (a factory floor, a shop) runs its own Mosquitto; its devices connect to it and
nothing in the agent changes. The site broker bridges to the cloud broker (MQTT v5, TLS)
under its own account, whose ACL on the cloud side (``broker/acl.py`` ``site_rules``) lets
it write the fleet's device uplink leaves and read the model topics and device downlink
leaves, nothing else. When the cloud is unreachable the uplink queues in the bridge's local
session on the site broker (``cleansession false``), sized here for hours of outage;
devices keep getting PUBACKs from the site broker and their spools stay small.

Layout: the cloud's fleet directory gets the account (registry ``sites``, password file,
ACL, bundle ``credentials/<site>/``); the site's directory is a fleet directory of its own
(devices are provisioned into it with ``knet broker provision --dir SITE_DIR``) plus
``bridge/`` (the CA and ``bridge.json``, 0600: the bridge's password, because Mosquitto reads
a bridge password only from its config). ``knet broker run --dir SITE_DIR`` then starts the
site broker with the bridge (``fleet_settings`` adds it).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.wire.topics import Topics, validate_id
from broker import certs as pki
from broker.acl import SITE_DOWN_LEAVES, SITE_UP_LEAVES
from broker.config import BridgeSettings, BrokerSettings
from broker.provision import (
    DEFAULT_TLS_PORT,
    ProvisionError,
    _atomic_write,
    _issue_secret,
    _load_registry,
    _locked,
    _now,
    _save_registry,
    _write_acl,
    fleet_ids,
    init_fleet_dir,
    layout,
    reload_broker,
)

BRIDGE_DIR = "bridge"


@dataclass(frozen=True)
class SiteBridge:
    """What ``provision_site`` made: where, and how much outage the site can absorb."""

    site: str
    fleets: tuple[str, ...]
    site_dir: Path
    address: str
    max_queued_messages: int
    max_queued_bytes: int
    outage_hours: float


def provision_site(cloud_dir: Path | str, site: str, fleets: str | Iterable[str],
                   site_dir: Path | str, *, cloud_host: str, cloud_port: int | None = None,
                   tls: bool = True, server_names: Iterable[str] = pki.DEFAULT_SERVER_NAMES,
                   outage_hours: float = 8.0, rate_msgs_s: float = 10.0,
                   avg_msg_bytes: int = 2048, reload: bool = True) -> SiteBridge:
    """Create (or rotate) the site's cloud account and write the site broker's bridge.

    The site broker's queue holds ``outage_hours`` of ``rate_msgs_s`` messages of
    ``avg_msg_bytes`` (Mosquitto keeps queued messages in memory and in its persistence
    file: size the site host for ``max_queued_bytes``).
    """
    validate_id(site, "site id")
    fleet_list = fleet_ids(fleets, "a site")
    if outage_hours <= 0 or rate_msgs_s <= 0 or avg_msg_bytes <= 0:
        raise ProvisionError("outage hours, rate and message size must be positive")
    lay = init_fleet_dir(cloud_dir)
    with _locked(lay):
        reg = _load_registry(lay)
        if site in reg["devices"] or site in reg["trainers"]:
            raise ProvisionError(f"{site!r} is already a device or trainer account")
        secret = _issue_secret(lay, reg, site, password=None, cert=False, tls=tls,
                               server_names=server_names)
        reg.setdefault("sites", {})[site] = {"fleets": fleet_list, "auth": "password",
                                             "created": _now()}
        _save_registry(lay, reg)
        _write_acl(lay, reg)
        prefix = reg["prefix"]
    assert secret.password is not None
    site_lay = init_fleet_dir(site_dir, prefix)
    bridge_dir = site_lay.root / BRIDGE_DIR
    bridge_dir.mkdir(mode=0o700, exist_ok=True)
    ca_file = None
    if tls:
        assert secret.ca_file is not None
        ca_file = bridge_dir / "ca.crt"
        shutil.copyfile(secret.ca_file, ca_file)
    messages = math.ceil(outage_hours * 3600 * rate_msgs_s)
    port = cloud_port or (DEFAULT_TLS_PORT if tls else 1883)
    doc = {"site": site, "fleets": fleet_list, "prefix": prefix,
           "address": f"{cloud_host}:{port}", "password": secret.password,
           "cafile": str(ca_file) if ca_file else None, "created": _now(),
           "max_queued_messages": messages, "max_queued_bytes": messages * avg_msg_bytes,
           "outage_hours": outage_hours}
    _atomic_write(bridge_dir / "bridge.json", json.dumps(doc, indent=2) + "\n", 0o600)
    if reload:
        reload_broker(lay.root)
        reload_broker(site_lay.root)
    return SiteBridge(site, tuple(fleet_list), site_lay.root, doc["address"], messages,
                      messages * avg_msg_bytes, outage_hours)


def site_bridge_settings(site_dir: Path | str, settings: BrokerSettings) -> BrokerSettings:
    """``settings`` with the site's bridge and queue limits when ``site_dir`` is a site."""
    path = layout(site_dir).root / BRIDGE_DIR / "bridge.json"
    if not path.exists():
        return settings
    doc = json.loads(path.read_text())
    out_topics, in_topics = [], []
    for fleet in doc["fleets"]:
        t = Topics(fleet, doc["prefix"])
        out_topics += [t.all_devices(leaf) for leaf in SITE_UP_LEAVES]
        in_topics += [t.all_devices(leaf) for leaf in SITE_DOWN_LEAVES]
        in_topics.append(f"{t.fleet_root}/model/#")
    bridge = BridgeSettings(name=f"knet-bridge-{doc['site']}", address=doc["address"],
                            remote_username=doc["site"], remote_password=doc["password"],
                            cafile=Path(doc["cafile"]) if doc.get("cafile") else None,
                            out_topics=out_topics, in_topics=in_topics)
    return settings.model_copy(update={
        "bridge": bridge,
        "max_queued_messages": max(settings.max_queued_messages, doc["max_queued_messages"]),
        "max_queued_bytes": max(settings.max_queued_bytes, doc["max_queued_bytes"])})
