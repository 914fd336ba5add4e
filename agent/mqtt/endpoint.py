"""How a connection reaches the broker: the one settings model every MQTT client is built from.

The agent's and the trainer's ``[mqtt]`` tables are this model (plus a few keys of their own),
and so are the settings of the device link, the trainer's ingest and the blob publisher. One
model means one set of defaults: before it, reconnect delays were 1 s here and 0.5 s there,
keepalive limits differed, and some trainer connections ignored the configured values.

Fields fall in two groups. Address, credentials, TLS, keepalive and reconnect back-off are
the *endpoint's*: every connection of an account shares them. Client id and session
(``clean_start``, ``session_expiry``) belong to *one connection*: :meth:`MqttEndpoint.derive`
copies the first group into another connection's settings and leaves it its own second group.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from agent.configfile import ConfigError, resolve_path
from agent.wire.topics import connection_username

E = TypeVar("E", bound="MqttEndpoint")

# Fields that describe one connection, not the account: never copied between connections.
PER_CONNECTION: tuple[str, ...] = ("client_id", "clean_start", "session_expiry")
SESSION_EXPIRY_MAX = 2**32 - 1  # MQTT v5: a four-byte integer; this value means "never"


class TlsSettings(BaseModel):
    """TLS through paho's public ``tls_set``; a client certificate needs its key."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = Field(None, description="the broker's CA (None: the system's "
                                                   "trust store)")
    cert_file: Path | None = None
    key_file: Path | None = None

    _paths = field_validator("ca_file", "cert_file", "key_file")(resolve_path)

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate auth)")
        return self

    def for_connection(self, connection: str) -> TlsSettings:
        """The certificate of one of the account's extra connections: ``knet broker
        provision`` writes it to ``<cert dir>/<connection>/`` under the same file names."""
        cert, key = self.cert_file, self.key_file
        if cert is None or key is None:
            return self
        return self.model_copy(update={"cert_file": cert.parent / connection / cert.name,
                                       "key_file": key.parent / connection / key.name})


class MqttEndpoint(BaseModel):
    """Broker address, credentials, TLS, keepalive, reconnect back-off, session, client id."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_credential: str | None = Field(
        None, description="name of a systemd credential in $CREDENTIALS_DIRECTORY")
    tls: TlsSettings | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    reconnect_min_delay: float = Field(0.5, gt=0)
    reconnect_max_delay: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    client_id: str | None = Field(None, min_length=1, max_length=256,
                                  description="None: the connection's own default")
    clean_start: bool = Field(True, description="false: resume the broker's session")
    session_expiry: int = Field(0, ge=0, le=SESSION_EXPIRY_MAX,
                                description="seconds the broker keeps the session (its "
                                            "subscriptions and queued QoS 1 messages) "
                                            "after a disconnect")

    _paths = field_validator("password_file")(resolve_path)

    @model_validator(mode="after")
    def _consistent(self) -> MqttEndpoint:
        given = [n for n in ("password", "password_file", "password_credential")
                 if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of password, password_file, password_credential "
                             f"(got {', '.join(given)})")
        if self.reconnect_min_delay > self.reconnect_max_delay:
            raise ValueError(f"reconnect_min_delay {self.reconnect_min_delay} > "
                             f"reconnect_max_delay {self.reconnect_max_delay}")
        cred = self.password_credential
        if cred is not None and ("/" in cred or cred in ("", ".", "..")):
            raise ValueError("password_credential is a credential name, not a path")
        return self

    def resolve_password(self) -> SecretStr | None:
        """Read the secret now; a missing file or credential is a ConfigError."""
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return SecretStr(_read_secret(self.password_file, "mqtt.password_file"))
        if self.password_credential is not None:
            cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
            if not cred_dir:
                raise ConfigError("mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set "
                                  "(run under systemd with LoadCredential=, or use password_file)")
            return SecretStr(_read_secret(Path(cred_dir) / self.password_credential,
                                          "mqtt.password_credential"))
        return None

    def for_connection(self, connection: str) -> MqttEndpoint:
        """The same account's extra connection ``connection``: the broker binds a session
        to its username, so it logs in as ``<username>.<connection>`` (a certificate account
        with the certificate from ``<cert dir>/<connection>/``) and needs its own client id."""
        return self.model_copy(update={
            "username": connection_username(self.username, connection) if self.username
            else None,
            "tls": self.tls.for_connection(connection) if self.tls is not None else None,
            "client_id": None,
        })

    def derive(self, cls: type[E], **overrides: Any) -> E:
        """Settings of type ``cls`` that reach the broker like this endpoint does: address,
        credentials, TLS, keepalive and back-off from here; client id and session from
        ``cls``'s defaults unless ``overrides`` name them."""
        shared = {k: getattr(self, k) for k in MqttEndpoint.model_fields
                  if k not in PER_CONNECTION}
        return cls(**{**shared, **overrides})

    def describe(self) -> str:
        """``host:port as user`` for logs (never the secret)."""
        return f"{self.host}:{self.port} as {self.username or '(anonymous)'}"


class LinkSettings(MqttEndpoint):
    """The device link's endpoint (``agent.mqtt.link``) and its flow control: the agent's
    ``[mqtt]`` table. Its session survives a disconnect, so the broker queues what the
    device is subscribed to while it is away."""

    clean_start: bool = False
    session_expiry: int = Field(3600, ge=0, le=SESSION_EXPIRY_MAX)
    max_inflight: int = Field(20, ge=1, le=1000)
    # Keep at or below the broker's message_size_limit: Mosquitto 2.0 answers a bigger
    # publish by dropping the connection, and a spooled one would then be re-sent after
    # every reconnect for ever (a poison message), so the link refuses it before spooling.
    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1)
    # Shape the spooled (reliable) traffic to this many payload bytes per second (0: as
    # fast as the broker acks): a metered link's share, and how tests emulate a slow
    # uplink. Best-effort publishes (stats, split requests) are not shaped.
    max_uplink_bytes_per_s: float = Field(0.0, ge=0)


def _read_secret(path: Path, field: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None


__all__ = ["PER_CONNECTION", "LinkSettings", "MqttEndpoint", "TlsSettings"]
