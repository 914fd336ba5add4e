"""Parsing model references (no torch): a zoo name, or an import path ``package.module:factory``.

Kept apart from ``cloud_trainer.models.zoo.refs`` (which builds the models) so that the command
line can validate ``--model`` without importing torch; the zoo is imported only when a
reference is actually parsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cloud_trainer.errors import KnetTrainerError

Shape = tuple[int, ...]

_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
DEFAULT_CUTS = "modules"


class ModelRefError(KnetTrainerError, ValueError):
    """A model reference that cannot be used; the text says which part and why."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: ``zoo`` set for a zoo name, else ``module`` and ``attr``."""

    text: str
    zoo: str | None = None
    module: str | None = None
    attr: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        from cloud_trainer.models.zoo import zoo_names

        text = text.strip()
        if ":" not in text:
            if text not in zoo_names():
                raise ModelRefError(f"{text!r} is neither a zoo model ({', '.join(zoo_names())})"
                                    " nor an import path package.module:factory")
            return cls(text, zoo=text)
        if not _PATH_RE.fullmatch(text):
            raise ModelRefError(f"{text!r}: an import path is package.module:factory "
                                "(Python identifiers)")
        module, attr = text.split(":")
        return cls(text, module=module, attr=attr)

    @property
    def model_id(self) -> str:
        """A manifest-safe id: the zoo name, or the factory's name in lowercase."""
        if self.zoo is not None:
            return self.zoo
        name = re.sub(r"[^a-z0-9_.-]+", "-", str(self.attr).split(".")[-1].lower()).strip("-_.")
        return (name or "model")[:63]


def model_ref(text: str) -> ModelRef:
    """``argparse`` type for ``--model``: a zoo name or an import path (syntax checked)."""
    import argparse

    try:
        return ModelRef.parse(text)
    except ModelRefError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def zoo_name(text: str) -> str:
    """``argparse`` type for commands that need a zoo model's bundled data."""
    import argparse

    from cloud_trainer.models.zoo import zoo_names

    if text in zoo_names():
        return text
    why = ("this command needs the zoo model's bundled data; an import-path model has none"
           if ":" in text else "not a zoo model")
    raise argparse.ArgumentTypeError(f"{text!r}: {why} (choose from {', '.join(zoo_names())})")


def parse_shape(text: str | Sequence[int] | None) -> Shape | None:
    """``"3,96,96"`` (or a sequence) → ``(3, 96, 96)``; positive integers only."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelRefError(f"input shape {text!r}: comma-separated integers, e.g. 3,96,96"
                            ) from None
    if not shape or any(d < 1 for d in shape):
        raise ModelRefError(f"input shape {text!r}: dimensions must be positive")
    return shape
