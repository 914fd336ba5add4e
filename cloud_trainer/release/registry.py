"""The model registry: every trained student version, content-addressed, with its lineage.

A version is a list of block weights (one content-addressed file per block, so a version
that changes one block shares the others with its parent), its parent, the data window it
was trained on, its gate scores, and where it is in its life: candidate → rejected | approved
→ pushed (→ superseded). Rollback makes a *new* version whose blocks are an older one's, so
version numbers only grow and devices never need to accept a downgrade for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)

STATUSES = ("candidate", "rejected", "approved", "pushed", "superseded", "failed")


class RegistryError(KnetTrainerError, RuntimeError):
    """A version that does not exist or a transition that is not allowed."""


class _Base(DeclarativeBase):
    pass


class VersionRow(_Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    reason: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    blocks: Mapped[list[BlockRow]] = relationship(
        back_populates="owner", order_by="BlockRow.index", cascade="all, delete-orphan")


class BlockRow(_Base):
    __tablename__ = "version_blocks"
    __table_args__ = (UniqueConstraint("version_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    index: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[VersionRow] = relationship(back_populates="blocks")


@dataclass(frozen=True)
class ModelVersion:
    model_id: str
    version: int
    parent: int | None
    status: str
    reason: str
    created_at: datetime
    window: dict[str, Any]
    scores: dict[str, Any]
    info: dict[str, Any]
    blocks: dict[int, str]  # block index -> sha256 of its weights

    def changed_blocks(self, other: ModelVersion | None) -> list[int]:
        if other is None:
            return sorted(self.blocks)
        return sorted(i for i, sha in self.blocks.items() if other.blocks.get(i) != sha)

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["created_at"] = self.created_at.isoformat()
        return d


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A content address for a block's weights that does not depend on pickling details."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class Registry:
    """Versions in SQLite (via SQLAlchemy), block weights as files under ``root/blocks``.

    With ``engine`` (PostgreSQL, ``[database]``) the versions live there and so do the block
    weights (``block_weights``, bytea): whichever replica leads next must load them, and one
    database backup then holds versions and weights consistently; ``root/blocks`` is only a
    local cache. The schema is Alembic's (``cloud_trainer/storage/migrations``).
    """

    def __init__(self, root: Path | str, engine: Engine | None = None) -> None:
        self.root = Path(root)
        self.blocks_dir = self.root / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self.shared = engine is not None
        if engine is None:
            engine = create_engine(f"sqlite:///{self.root / 'registry.sqlite3'}")
            event.listen(engine, "connect", _sqlite_pragmas)
            _Base.metadata.create_all(engine)
        self.engine = engine

    # --- writing
    def put_block(self, state: Mapping[str, torch.Tensor]) -> str:
        """Store one block's weights (idempotent); returns their sha256."""
        digest = weights_digest(state)
        path = self.blocks_dir / f"{digest}.pt"
        if not path.exists() or self.shared:
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
            if self.shared:
                with self.engine.begin() as conn:
                    conn.execute(text(
                        "INSERT INTO block_weights (sha256, size, data) VALUES (:s, :n, :d) "
                        "ON CONFLICT (sha256) DO NOTHING"),
                        {"s": digest, "n": buf.tell(), "d": buf.getvalue()})
            if not path.exists():
                _write_atomic(path, buf.getvalue())
        return digest

    def add_version(self, model_id: str, block_states: Sequence[Mapping[str, torch.Tensor]], *,
                    parent: int | None = None, status: str = "candidate",
                    window: dict[str, Any] | None = None, scores: dict[str, Any] | None = None,
                    info: dict[str, Any] | None = None, reason: str = "") -> ModelVersion:
        """Register a new version numbered after the highest so far (blocks are 1-based)."""
        _check_status(status)
        shas = [self.put_block(s) for s in block_states]
        with Session(self.engine) as s, s.begin():
            top = s.scalar(select(VersionRow.version).where(VersionRow.model_id == model_id)
                           .order_by(VersionRow.version.desc()).limit(1))
            row = VersionRow(model_id=model_id, version=(top or 0) + 1, parent=parent,
                             status=status, reason=reason, created_at=datetime.now(UTC),
                             window=window or {}, scores=scores or {}, info=info or {})
            row.blocks = [BlockRow(index=i + 1, sha256=sha) for i, sha in enumerate(shas)]
            s.add(row)
            s.flush()
            result = _to_version(row)
        log.info("registered %s v%d (%s)", model_id, result.version, status)
        return result

    def set_status(self, model_id: str, version: int, status: str, reason: str = "",
                   scores: dict[str, Any] | None = None) -> ModelVersion:
        _check_status(status)
        with Session(self.engine) as s, s.begin():
            row = self._row(s, model_id, version)
            if status == "pushed":  # exactly one live version per model
                for other in s.scalars(select(VersionRow).where(
                        VersionRow.model_id == model_id, VersionRow.status == "pushed")):
                    other.status = "superseded"
            row.status = status
            if reason:
                row.reason = reason[:500]
            if scores is not None:
                row.scores = {**row.scores, **scores}
            return _to_version(row)

    def rollback(self, model_id: str, to_version: int) -> ModelVersion:
        """A new approved version with the blocks of ``to_version``; push it as any other."""
        old = self.get(model_id, to_version)
        states = [self.load_block(old.blocks[i]) for i in sorted(old.blocks)]
        return self.add_version(model_id, states, parent=to_version, status="approved",
                                reason=f"rollback to v{to_version}",
                                info={"rollback_of": to_version})

    # --- reading
    def get(self, model_id: str, version: int) -> ModelVersion:
        with Session(self.engine) as s:
            return _to_version(self._row(s, model_id, version))

    def versions(self, model_id: str | None = None) -> list[ModelVersion]:
        with Session(self.engine) as s:
            q = select(VersionRow).order_by(VersionRow.model_id, VersionRow.version)
            if model_id:
                q = q.where(VersionRow.model_id == model_id)
            return [_to_version(r) for r in s.scalars(q)]

    def deployed(self, model_id: str) -> ModelVersion | None:
        with Session(self.engine) as s:
            row = s.scalar(select(VersionRow).where(
                VersionRow.model_id == model_id, VersionRow.status == "pushed"))
            return _to_version(row) if row else None

    def load_block(self, sha256: str) -> dict[str, torch.Tensor]:
        path = self.blocks_dir / f"{sha256}.pt"
        if not path.exists() and self.shared:
            with self.engine.connect() as conn:
                data = conn.scalar(text("SELECT data FROM block_weights WHERE sha256 = :s"),
                                   {"s": sha256})
            if data is not None:
                _write_atomic(path, bytes(data))  # the local cache
        if not path.exists():
            raise RegistryError(f"block weights {sha256[:12]}… missing from {self.blocks_dir}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if weights_digest(state) != sha256:
            raise RegistryError(f"block weights {path} do not match their sha256 (corrupted)")
        return state

    def load_into(self, model: torch.nn.Module, version: ModelVersion) -> torch.nn.Module:
        """Load a version's weights into a BlockModel of the same architecture."""
        for index, sha in version.blocks.items():
            model.block(index).load_state_dict(self.load_block(sha))  # type: ignore[operator]
        return model

    @staticmethod
    def _row(s: Session, model_id: str, version: int) -> VersionRow:
        row = s.scalar(select(VersionRow).where(
            VersionRow.model_id == model_id, VersionRow.version == version))
        if row is None:
            raise RegistryError(f"{model_id} v{version} is not in the registry")
        return row


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _to_version(row: VersionRow) -> ModelVersion:
    return ModelVersion(
        model_id=row.model_id, version=row.version, parent=row.parent, status=row.status,
        reason=row.reason, created_at=row.created_at, window=dict(row.window or {}),
        scores=dict(row.scores or {}), info=dict(row.info or {}),
        blocks={b.index: b.sha256 for b in row.blocks},
    )


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise RegistryError(f"status {status!r} is not one of {', '.join(STATUSES)}")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def dumps(versions: Sequence[ModelVersion]) -> str:
    return json.dumps([v.to_dict() for v in versions], indent=2)
