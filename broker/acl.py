"""Render Mosquitto's ``acl_file`` from the fleet registry.

Every account gets explicit ``user`` entries; there is no ``pattern`` line. The pattern
``knet/v1/+/%u/#`` would let device ``a`` of fleet ``x`` write ``knet/v1/y/a/...`` — it could
pose as a device of another fleet, or squat an id that fleet has not provisioned yet. The
registry knows each device's fleet, so the ACL names it. The cost is three lines per device
and a reload (SIGHUP) after provisioning, which provisioning needs for the password file
anyway.

Mosquitto 2.0.11 behaviour this relies on (tests/test_broker_acl.py checks it):

* a publish outside the ACL is dropped; an MQTT v5 client gets PUBACK reason 135;
* a subscription outside the ACL is still granted (SUBACK QoS 1), but every message is
  checked against ``read`` access on delivery, so nothing outside the ACL arrives;
* ``$share/<group>/<filter>`` is checked against ``<filter>``: the trainer's shared
  subscriptions need no ACL line of their own;
* an account with no entries can connect but read and write nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent.wire.topics import Topics, connection_username, validate_id

# What the trainer reads from every device of its fleets, and what it answers on.
TRAINER_READ_LEAVES = ("act", "state", "birth", "stats", "update", "infer", "blobreq", "result",
                       "bench")
TRAINER_WRITE_LEAVES = ("reply",)


def device_rules(device: str, fleet: str, prefix: str = "knet") -> list[str]:
    """A device: everything under its own subtree, read-only on its fleet's model topics."""
    t = Topics(fleet, prefix)
    validate_id(device)
    return [
        f"topic readwrite {t.fleet_root}/{device}/#",
        f"topic read {t.fleet_root}/model/#",
    ]


def chain_rules(device: str, upstream: str, fleet: str, prefix: str = "knet") -> list[str]:
    """A later stage of a chain (``agent/infer/chain.py``) reads its upstream stage's relay topic,
    and nothing else of that device."""
    validate_id(device)
    return [f"topic read {Topics(fleet, prefix).chain(upstream)}"]


def trainer_rules(trainer: str, fleets: Iterable[str], prefix: str = "knet") -> list[str]:
    """A trainer: read the devices' uplink, publish the model and replies, own its state."""
    validate_id(trainer, "trainer id")
    rules: list[str] = []
    root = ""
    for fleet in sorted(set(fleets)):
        t = Topics(fleet, prefix)
        root = t.root
        rules += [f"topic read {t.all_devices(leaf)}" for leaf in TRAINER_READ_LEAVES]
        rules += [f"topic write {t.all_devices(leaf)}" for leaf in TRAINER_WRITE_LEAVES]
        # readwrite: a publisher reads the retained manifest back to know what is live.
        rules.append(f"topic readwrite {t.fleet_root}/model/#")
    if not root:
        root = Topics("default", prefix).root
    rules += [
        f"topic readwrite {root}/trainer/{trainer}/state",
        f"topic read {root}/trainer/+/state",  # replicas see each other
    ]
    return rules


# What a site broker's bridge forwards: device uplink up, model and downlink down.
SITE_UP_LEAVES = ("act", "state", "birth", "stats", "update", "infer", "blobreq", "result",
                  "bench")
SITE_DOWN_LEAVES = ("input", "reply")


def site_rules(site: str, fleets: Iterable[str], prefix: str = "knet") -> list[str]:
    """A site broker's bridge account: write the fleet's device uplink leaves, read the model
    topics and the devices' downlink leaves; never the model topics' writes nor trainers'.
    It is trusted for every device id of its fleets (the site broker authenticates them)."""
    validate_id(site, "site id")
    rules: list[str] = []
    for fleet in sorted(set(fleets)):
        t = Topics(fleet, prefix)
        rules += [f"topic write {t.all_devices(leaf)}" for leaf in SITE_UP_LEAVES]
        rules += [f"topic read {t.all_devices(leaf)}" for leaf in SITE_DOWN_LEAVES]
        rules.append(f"topic read {t.fleet_root}/model/#")
    return rules


def render_acl(
    devices: Mapping[str, str],
    trainers: Mapping[str, Iterable[str]],
    prefix: str = "knet",
    upstreams: Mapping[str, str] | None = None,
    connections: Mapping[str, Iterable[str]] | None = None,
    sites: Mapping[str, Iterable[str]] | None = None,
) -> str:
    """The whole ACL file: ``devices`` maps device id → fleet, ``trainers`` id → fleets,
    ``upstreams`` a chain stage's device id → its upstream stage (same fleet),
    ``connections`` an account → its extra connections, each a username
    ``<account>.<connection>`` with the account's own rules.

    Output is sorted so regenerating an unchanged registry gives an identical file.
    """
    sites = sites or {}
    clash = (set(devices) & set(trainers)) | ((set(devices) | set(trainers)) & set(sites))
    if clash:
        raise ValueError(f"ids used by both a device and a trainer, or by a site too: "
                         f"{sorted(clash)}")
    lines = [
        "# Generated by knet (broker/acl.py) from the fleet registry. Do not edit: run",
        "# `knet broker provision` / `knet broker revoke`, then reload the broker (SIGHUP).",
        "# No topic lines before the first `user`: anonymous clients get nothing.",
    ]
    upstreams = upstreams or {}
    for device, up in upstreams.items():
        if devices.get(up) != devices.get(device):
            raise ValueError(f"chain stage {device!r} and its upstream {up!r} must be "
                             f"devices of the same fleet")
    connections = connections or {}

    def users(account: str) -> list[str]:
        return [account, *(connection_username(account, c)
                           for c in sorted(set(connections.get(account, ()))))]

    for device in sorted(devices):
        rules = device_rules(device, devices[device], prefix)
        if device in upstreams:
            rules += chain_rules(device, upstreams[device], devices[device], prefix)
        for user in users(device):
            lines += ["", f"# device {device} of fleet {devices[device]}", f"user {user}",
                      *rules]
    for trainer in sorted(trainers):
        fleets = sorted(set(trainers[trainer]))
        for user in users(trainer):
            lines += ["", f"# trainer {trainer} of fleet(s) {', '.join(fleets)}",
                      f"user {user}", *trainer_rules(trainer, fleets, prefix)]
    for site in sorted(sites):
        fleets = sorted(set(sites[site]))
        lines += ["", f"# site broker bridge {site} of fleet(s) {', '.join(fleets)}",
                  f"user {site}", *site_rules(site, fleets, prefix)]
    return "\n".join(lines) + "\n"
