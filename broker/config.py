"""Render a mosquitto.conf from a validated model.

The queue limits are explicit on purpose: Mosquitto's default ``max_queued_messages 1000``
silently dropped QoS 1 messages for a slow subscriber here while the publisher still got a
PUBACK for each one. docs/broker.md justifies the numbers.

Three listeners at most: the plain one (loopback by default: development and a trainer on
the broker's host), ``tls`` (server certificate; clients log in with a password) and ``mtls``
(client certificates; the certificate's CN becomes the username, so the ACL applies).
Mosquitto refuses a client without a certificate on a ``use_identity_as_username``
listener, hence two TLS listeners when a fleet mixes passwords and certificates.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TlsListener(BaseModel):
    """One TLS listener; Mosquitto 2.0.11 re-reads its certificates and CRL on SIGHUP."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(8883, ge=1, le=65535)
    bind_address: str = "127.0.0.1"
    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    use_identity_as_username: bool = False
    crlfile: Path | None = None

    @model_validator(mode="after")
    def _identity_needs_cert(self) -> TlsListener:
        if self.use_identity_as_username and not self.require_certificate:
            raise ValueError("use_identity_as_username needs require_certificate = true")
        return self

    def render(self) -> list[str]:
        return [
            f"listener {self.port} {self.bind_address}",
            "protocol mqtt",
            f"cafile {self.cafile}",
            f"certfile {self.certfile}",
            f"keyfile {self.keyfile}",
            *([f"crlfile {self.crlfile}"] if self.crlfile else []),
            f"require_certificate {'true' if self.require_certificate else 'false'}",
            f"use_identity_as_username {'true' if self.use_identity_as_username else 'false'}",
        ]


class BridgeSettings(BaseModel):
    """A site broker's MQTT v5 bridge to the cloud broker (``broker/site.py``).

    Device uplink leaves go ``out``, the fleet's model topics and each device's downlink
    leaves come ``in``; QoS 1 both ways. ``cleansession false`` on both ends: the cloud keeps
    the bridge's session (what it subscribed for the site) and the site keeps the bridge's
    local session, whose queue holds the uplink while the cloud is unreachable; its size is
    the site broker's ``max_queued_messages``/``bytes``, sized by ``provision-site``.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    address: str  # host:port of the cloud broker's TLS listener
    remote_username: str
    remote_password: str
    cafile: Path | None = None  # None: no TLS (tests on loopback only)
    out_topics: list[str]
    in_topics: list[str]
    keepalive: int = Field(30, ge=5)
    restart_timeout: tuple[int, int] = (1, 30)  # reconnect back-off, seconds

    def render(self) -> list[str]:
        lines = [
            f"connection {self.name}",
            f"address {self.address}",
            "bridge_protocol_version mqttv50",
            f"remote_clientid {self.remote_username}",
            f"remote_username {self.remote_username}",
            f"remote_password {self.remote_password}",
            f"local_clientid {self.name}",
            "cleansession false",
            "local_cleansession false",
            "start_type automatic",
            f"restart_timeout {self.restart_timeout[0]} {self.restart_timeout[1]}",
            f"keepalive_interval {self.keepalive}",
            # Connection notices stay local: the site's account may not write $SYS.
            "notifications true",
            "notifications_local_only true",
        ]
        if self.cafile is not None:
            lines += [f"bridge_cafile {self.cafile}", "bridge_insecure false",
                      "bridge_tls_version tlsv1.2"]
        lines += [f"topic {t} out 1" for t in self.out_topics]
        lines += [f"topic {t} in 1" for t in self.in_topics]
        return lines


class BrokerSettings(BaseModel):
    """Everything knet sets in a mosquitto.conf; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(1883, ge=1, le=65535)
    bind_address: str = "127.0.0.1"
    # Started as root, Mosquitto drops to the `mosquitto` user, which then cannot read a
    # private directory's password file (fatal) nor write its log and persistence database
    # (silently: a restart then loses sessions and retained messages). The launcher sets
    # this to the invoking user so a private broker runs as whoever started it.
    user: str | None = None
    allow_anonymous: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None
    persistence: bool = True
    persistence_location: Path | None = None
    log_file: Path | None = None
    # Per client. Sized so the trainer's session holds ~3 minutes of a 1000-device fleet
    # sending 1 activation/s each (docs/broker.md); 0 would mean unlimited.
    max_queued_messages: int = Field(200_000, ge=0)
    max_queued_bytes: int = Field(512 * 1024 * 1024, ge=0)
    max_inflight_messages: int = Field(100, ge=0)
    # Above the largest legitimate message (a manifest with ~1.1 MB of chunk hashes, a raw
    # frame) and equal to the agent's max_payload_bytes: Mosquitto 2.0 disconnects a v5
    # client that sends more.
    message_size_limit: int = Field(16 * 1024 * 1024, ge=0)
    # Sessions of devices that never come back (v3 clients, or v5 with an infinite session
    # expiry) would otherwise hold queued chunks forever. Mosquitto syntax: 30d, 12h, 1w.
    persistent_client_expiration: str | None = "30d"
    tls: TlsListener | None = None
    mtls: TlsListener | None = None
    # Every listener replaces the client id a client sends by its username (on the mTLS
    # listener: the certificate's CN), so an account can only ever hold its own session:
    # without it a device logging in with another account's client id took over that
    # account's persistent session and disconnected it (docs/broker.md, threat model). An
    # account that needs several connections gets one username per connection
    # (``<account>.<connection>``, broker/provision.py). Anonymous clients are refused.
    username_as_clientid: bool = False
    # A site broker's bridge to the cloud (broker/site.py); None on the cloud broker itself.
    bridge: BridgeSettings | None = None

    @field_validator("persistent_client_expiration")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[1-9][0-9]*[hdwmy]", v):
            raise ValueError(f"{v!r} is not a Mosquitto duration such as 12h, 30d, 2w")
        return v

    @model_validator(mode="after")
    def _distinct_ports(self) -> BrokerSettings:
        ports = [self.port, *(t.port for t in (self.tls, self.mtls) if t)]
        if len(set(ports)) != len(ports):
            raise ValueError(f"listeners need distinct ports, got {ports}")
        if self.mtls and not self.mtls.use_identity_as_username:
            raise ValueError("the mtls listener maps certificates to users: "
                             "set require_certificate and use_identity_as_username")
        if self.username_as_clientid and self.allow_anonymous:
            raise ValueError("username_as_clientid refuses clients without a username: "
                             "it needs allow_anonymous = false")
        return self

    def render(self) -> str:
        lines = [
            "# Generated by knet (broker/config.py). Edit the settings, not this file.",
            "per_listener_settings false",
            *([f"user {self.user}"] if self.user else []),
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"message_size_limit {self.message_size_limit}",
            f"persistence {'true' if self.persistence else 'false'}",
        ]
        if self.persistent_client_expiration:
            lines.append(f"persistent_client_expiration {self.persistent_client_expiration}")

        if self.persistence and self.persistence_location:
            lines.append(f"persistence_location {_dir(self.persistence_location)}")
            lines.append("autosave_interval 5")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.log_file:
            lines += [f"log_dest file {self.log_file}", "log_type error", "log_type warning",
                      "log_type notice", "log_type information", "connection_messages true"]
        else:
            lines.append("log_dest stderr")
        bind = ([f"use_username_as_clientid {'true' if self.username_as_clientid else 'false'}"])
        lines += ["", f"listener {self.port} {self.bind_address}", "protocol mqtt", *bind]
        for listener in (self.tls, self.mtls):
            if listener:
                lines += ["", *listener.render(), *bind]
        if self.bridge is not None:
            lines += ["", *self.bridge.render()]
        return "\n".join(lines) + "\n"


def _dir(path: Path) -> str:
    # Mosquitto concatenates persistence_location and the file name: it needs the slash.
    text = str(path)
    return text if text.endswith("/") else text + "/"
