"""Loading TOML files into validated pydantic models, with errors a person can act on.

Every message names the file, the field and the reason, e.g.
``agent.toml: mqtt.port: Input should be less than or equal to 65535``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError, ValidationInfo

from agent.errors import KnetAgentError

if sys.version_info >= (3, 11):
    import tomllib  # novermin (tomli below on older Pythons)
else:  # Python < 3.11 (JetPack 5 and 6): the same parser, from PyPI
    import tomli as tomllib

M = TypeVar("M", bound=BaseModel)


class ConfigError(KnetAgentError, ValueError):
    """A configuration or profile file that cannot be used; the text says where and why."""


def resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """A field validator: relative paths resolve against the config file's directory
    (``base_dir`` in the validation context), so a deployment directory moves as a whole."""
    base = (info.context or {}).get("base_dir")
    if value is None or value.is_absolute() or base is None:
        return value
    return (Path(base) / value).resolve()


def format_errors(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt? see the documented example)"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load_model(path: Path | str, model: type[M], context: dict[str, Any] | None = None) -> M:
    path = Path(path)
    data = read_toml(path)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_errors(exc)}") from None
