"""The partition manifest: which student blocks a node runs, and how to check them.

Written by the trainer's exporter (``cloud_trainer.models.export``), read by the agent. Block ``i``
maps boundary ``i-1`` to boundary ``i``; boundary 0 is the model input. Shapes exclude the
batch dimension, which is dynamic in every exported file.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import KnetAgentError

Shape = Tuple[int, ...]


class ManifestError(KnetAgentError, ValueError):
    """A manifest or one of its block files cannot be used; the text says what to fix."""


class BlockEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=1)
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)
    input_name: str = "input"
    output_name: str = "output"
    input_shape: Shape
    output_shape: Shape
    params: int = Field(0, ge=0)


class PartitionManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    model_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    model_version: int = Field(ge=1)
    role: Literal["student", "teacher"] = "student"
    dtype: Literal["float32"] = "float32"
    opset: int = Field(ge=7)
    ir_version: int = Field(ge=3)
    num_blocks: int = Field(ge=1)
    num_classes: int | None = None
    boundaries: tuple[Shape, ...]
    blocks: tuple[BlockEntry, ...]
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="after")
    def _consistent(self) -> PartitionManifest:
        if len(self.boundaries) != self.num_blocks + 1:
            raise ValueError(
                f"{len(self.boundaries)} boundary shapes for {self.num_blocks} blocks "
                f"(need num_blocks + 1)"
            )
        if not self.blocks:
            raise ValueError("a partition needs at least one block")
        indices = [b.index for b in self.blocks]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise ValueError(f"blocks must be a contiguous ascending slice, got {indices}")
        if indices[-1] > self.num_blocks:
            raise ValueError(f"block {indices[-1]} beyond num_blocks={self.num_blocks}")
        for b in self.blocks:
            if b.input_shape != self.boundaries[b.index - 1]:
                raise ValueError(f"block {b.index} input {b.input_shape} != boundary shape")
            if b.output_shape != self.boundaries[b.index]:
                raise ValueError(f"block {b.index} output {b.output_shape} != boundary shape")
        return self

    @property
    def first(self) -> int:
        return self.blocks[0].index

    @property
    def last(self) -> int:
        return self.blocks[-1].index

    @property
    def is_complete(self) -> bool:
        """True when this node holds the whole model and so makes its own predictions."""
        return self.first == 1 and self.last == self.num_blocks

    def block(self, index: int) -> BlockEntry:
        for b in self.blocks:
            if b.index == index:
                return b
        raise ManifestError(f"block {index} is not in this partition ({self.first}..{self.last})")

    def slice(self, first: int, last: int) -> PartitionManifest:
        """The same model restricted to blocks ``first..last`` (for a node of a chain)."""
        chosen = tuple(b for b in self.blocks if first <= b.index <= last)
        if len(chosen) != last - first + 1:
            raise ManifestError(f"blocks {first}..{last} are not all in this manifest")
        return self.model_copy(update={"blocks": chosen})

    # --- files
    @classmethod
    def load(cls, path: Path | str) -> PartitionManifest:
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such manifest") from None
        except ValidationError as exc:
            raise ManifestError(f"{path}: invalid manifest: {_errors(exc)}") from None

    def dump(self, path: Path | str) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        tmp.replace(path)
        return path

    def verify_files(self, base_dir: Path) -> dict[int, Path]:
        """Check every block file exists and matches its sha256; return index -> path."""
        paths: dict[int, Path] = {}
        for b in self.blocks:
            path = (base_dir / b.file).resolve()
            if not path.is_file():
                raise ManifestError(f"block {b.index}: file {path} does not exist")
            size = path.stat().st_size
            if size != b.size:
                raise ManifestError(f"block {b.index}: {path} is {size} bytes, manifest {b.size}")
            digest = sha256_file(path)
            if digest != b.sha256:
                raise ManifestError(
                    f"block {b.index}: {path} sha256 {digest[:12]}… != manifest "
                    f"{b.sha256[:12]}… (corrupted or replaced; re-export or re-download)"
                )
            paths[b.index] = path
        return paths


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
    )
