"""The ``[console]`` section of ``trainer.toml``.

Kept in the console package (``trainer_config`` only references it) so the console's
settings and their checks live beside the code that uses them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.configfile import resolve_path


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost``; any other name counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConsoleSection(BaseModel):
    """Where the console listens and who may use it.

    ``tokens_file`` holds one ``role name scrypt$...`` line per token (``knet console
    token`` writes them): the file never holds a token itself. ``read_anonymous``
    lets pages be read without a login (loopback only); actions always need an operator.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    bind: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8650, ge=0, le=65535, description="0: any free port (tests)")
    tokens_file: Path | None = None
    read_anonymous: bool = False
    session_ttl_s: float = Field(8 * 3600.0, gt=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    history: int = Field(720, ge=10, le=100_000, description="stats kept per device")
    stop_timeout_s: float = Field(5.0, gt=0)

    @field_validator("tokens_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _paths(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return resolve_path(v, info)

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        if v != "localhost":
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"bind {v!r} must be an IP address or 'localhost'") from None
        return v

    @model_validator(mode="after")
    def _exposure(self) -> ConsoleSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if not self.enabled:
            return self
        if not is_loopback(self.bind):
            if self.tls_cert_file is None:
                raise ValueError(f"bind {self.bind!r} is beyond loopback: tls_cert_file and "
                                 "tls_key_file are required")
            if self.read_anonymous:
                raise ValueError("read_anonymous is only allowed on a loopback bind")
            if self.tokens_file is None:
                raise ValueError("a console beyond loopback needs a tokens_file")
        for name in ("tokens_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

