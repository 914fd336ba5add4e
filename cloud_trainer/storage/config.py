"""The ``[database]`` section of trainer.toml: which PostgreSQL, and where its password is.

The URL never carries the password (a TOML file is read by many, copied into tickets and
backups); it comes from ``password_file`` or from a systemd credential
(``password_credential``, read from ``$CREDENTIALS_DIRECTORY`` as ``LoadCredential=`` lays
it out). No ``url`` means the embedded SQLite default.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from agent.configfile import ConfigError, resolve_path

_SCHEMES = ("postgresql", "postgresql+psycopg")


class DatabaseSection(BaseModel):
    """PostgreSQL for the sample store, registry, run log and job store (None: SQLite)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="postgresql://user@host:5432/dbname, no password")
    password_file: Path | None = None
    password_credential: str | None = Field(
        None, description="name of a systemd credential in $CREDENTIALS_DIRECTORY")
    connect_timeout_s: int = Field(10, ge=1, le=600)
    # How fast PostgreSQL notices a replica's host vanished (no FIN): its session, and with
    # it the scheduler's advisory lock, ends after idle + interval * count seconds.
    keepalive_idle_s: int = Field(5, ge=1)
    keepalive_interval_s: int = Field(2, ge=1)
    keepalive_count: int = Field(3, ge=1)
    leader_poll_s: float = Field(1.0, gt=0, le=60,
                                 description="how often a standby tries the scheduler lock")

    _paths = field_validator("password_file")(resolve_path)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            url = make_url(v)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        if url.drivername not in _SCHEMES:
            raise ValueError(f"scheme {url.drivername!r}: only postgresql:// is supported "
                             "(leave url out for the embedded SQLite store)")
        if url.password is not None:
            raise ValueError("the URL holds a password: put it in password_file or "
                             "password_credential, never in trainer.toml")
        if not url.database:
            raise ValueError("the URL names no database (postgresql://user@host/DBNAME)")
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> DatabaseSection:
        if self.password_file is not None and self.password_credential is not None:
            raise ValueError("give password_file or password_credential, not both")
        if self.password_credential is not None and (
                "/" in self.password_credential or self.password_credential in ("", ".", "..")):
            raise ValueError("password_credential is a credential name, not a path")
        if self.url is None and (self.password_file or self.password_credential):
            raise ValueError("a database password without database.url")
        return self

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def password(self) -> str | None:
        """The secret, read now; a missing file or credential is a ConfigError naming it."""
        if self.password_file is not None:
            return _read_secret(self.password_file, "database.password_file")
        if self.password_credential is not None:
            cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
            if not cred_dir:
                raise ConfigError("database.password_credential: $CREDENTIALS_DIRECTORY is not "
                                  "set (run under systemd with LoadCredential=, or use "
                                  "password_file)")
            return _read_secret(Path(cred_dir) / self.password_credential,
                                "database.password_credential")
        return None

    def sqlalchemy_url(self) -> URL:
        """The URL with the password filled in, for SQLAlchemy's psycopg 3 dialect."""
        if self.url is None:
            raise ConfigError("database.url is not set")
        url = make_url(self.url).set(drivername="postgresql+psycopg")
        password = self.password()
        if password is not None:
            url = url.set(password=password)
        return url.update_query_dict(self.connect_args_query())

    def connect_args_query(self) -> dict[str, str]:
        """libpq parameters every connection gets (timeouts, TCP keepalives both ways)."""
        return {
            "connect_timeout": str(self.connect_timeout_s),
            "keepalives": "1",
            "keepalives_idle": str(self.keepalive_idle_s),
            "keepalives_interval": str(self.keepalive_interval_s),
            "keepalives_count": str(self.keepalive_count),
            "application_name": "knet-trainer",
        }

    def conninfo(self) -> str:
        """A libpq conninfo string for psycopg (the sample store's raw connections)."""
        from psycopg.conninfo import make_conninfo

        url = self.sqlalchemy_url()
        params: dict[str, str | int] = {k: str(v) for k, v in url.query.items()}
        # The server side of the keepalive: the backend closes a session whose peer vanished.
        params["options"] = (f"-c tcp_keepalives_idle={self.keepalive_idle_s} "
                             f"-c tcp_keepalives_interval={self.keepalive_interval_s} "
                             f"-c tcp_keepalives_count={self.keepalive_count}")
        for key, value in (("host", url.host), ("port", url.port), ("user", url.username),
                           ("password", url.password), ("dbname", url.database)):
            if value is not None:
                params[key] = value
        return make_conninfo("", **params)

    def display(self) -> str:
        """The URL as logs and errors show it (never a password)."""
        return self.url or "sqlite (embedded)"


def _read_secret(path: Path, field: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None
