"""The trainer's run log: every retraining run, scheduler event and device update report.

Lives in the registry's SQLite file (its own tables), so one backup holds versions and the
history that produced them. A run row is written *before* its work starts and carries the
run id that every later step keys on (the candidate version records it too), so a trainer
killed mid-run is resumed, not repeated, and the registry never holds an orphan.

Run statuses: ``running`` (in progress or interrupted) → ``skipped`` (too few new samples)
| ``rejected`` (gate) | ``pushed`` | ``rollout_failed`` | ``failed`` (an error). Scheduler
events (a missed or failed job) are rows with ``kind="event"``.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agent.wire.update_report import UpdateReport
from cloud_trainer.release.registry import _sqlite_pragmas

TERMINAL = ("skipped", "rejected", "pushed", "rollout_failed", "failed")
MAX_ATTEMPTS = 3  # a run interrupted this often is given up (no crash loop)
MAX_REPORTS = 100_000  # update reports kept


class _Base(DeclarativeBase):
    pass


class RunRow(_Base):
    __tablename__ = "trainer_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="run")  # run | event
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(64), default="")
    trigger: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(16), default="running")
    step: Mapped[str] = mapped_column(String(16), default="start")
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                         nullable=True)
    deployed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    since: Mapped[float] = mapped_column(Float, default=0.0)
    until: Mapped[float] = mapped_column(Float, default=0.0)
    consumed: Mapped[int] = mapped_column(Integer, default=0)  # window used for training
    reason: Mapped[str] = mapped_column(String(1000), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ReportRow(_Base):
    __tablename__ = "update_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, index=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    detail: Mapped[str] = mapped_column(String(2000), default="")
    time: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Run:
    run_id: str
    kind: str
    job_id: str
    model_id: str
    trigger: str
    status: str
    step: str
    attempts: int
    started_at: datetime
    finished_at: datetime | None
    deployed_version: int | None
    version: int | None
    since: float
    until: float
    consumed: bool
    reason: str
    detail: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["started_at"] = self.started_at.isoformat()
        d["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        return d


def _run(row: RunRow) -> Run:
    return Run(run_id=row.run_id, kind=row.kind, job_id=row.job_id, model_id=row.model_id,
               trigger=row.trigger, status=row.status, step=row.step, attempts=row.attempts,
               started_at=row.started_at, finished_at=row.finished_at,
               deployed_version=row.deployed_version, version=row.version, since=row.since,
               until=row.until, consumed=bool(row.consumed), reason=row.reason,
               detail=dict(row.detail or {}))


class RunLog:
    """Runs, scheduler events and update reports (SQLAlchemy on the registry's SQLite)."""

    def __init__(self, registry_dir: Path | str, engine: Engine | None = None,
                 owner: str | None = None) -> None:
        """``engine``: the shared PostgreSQL (``[database]``), whose schema is Alembic's;
        ``owner``: the trainer id recorded in each run's detail (which replica ran it)."""
        self.owner = owner
        root = Path(registry_dir)
        root.mkdir(parents=True, exist_ok=True)
        if engine is None:
            engine = create_engine(f"sqlite:///{root / 'registry.sqlite3'}")
            event.listen(engine, "connect", _sqlite_pragmas)
            try:
                _Base.metadata.create_all(engine)
            except OperationalError as exc:  # another process created them meanwhile
                if "already exists" not in str(exc):
                    raise
                _Base.metadata.create_all(engine)
        self.engine = engine
        self.reports_changed = threading.Condition()

    # --- runs
    def open_run(self, job_id: str, model_id: str, trigger: str, *, since: float,
                 until: float, deployed_version: int | None) -> Run:
        with Session(self.engine) as s, s.begin():
            row = RunRow(run_id=uuid.uuid4().hex, job_id=job_id, model_id=model_id,
                         trigger=trigger, status="running", step="start",
                         started_at=datetime.now(UTC), since=since, until=until,
                         deployed_version=deployed_version,
                         detail={"trainer": self.owner} if self.owner else {})
            s.add(row)
            s.flush()
            return _run(row)

    def interrupted(self, job_id: str) -> Run | None:
        """The job's run that a crash left ``running`` (at most one: max_instances=1)."""
        with Session(self.engine) as s:
            row = s.scalar(select(RunRow).where(RunRow.job_id == job_id, RunRow.kind == "run",
                                                RunRow.status == "running")
                           .order_by(RunRow.id.desc()).limit(1))
            return _run(row) if row else None

    def resume(self, run_id: str) -> Run:
        with Session(self.engine) as s, s.begin():
            row = self._row(s, run_id)
            row.attempts += 1
            return _run(row)

    def update(self, run_id: str, **fields: Any) -> Run:
        """Set columns of a run; ``detail`` is merged, a terminal status stamps the end."""
        with Session(self.engine) as s, s.begin():
            row = self._row(s, run_id)
            detail = fields.pop("detail", None)
            if detail:
                row.detail = {**(row.detail or {}), **detail}
            if "reason" in fields:
                fields["reason"] = str(fields["reason"])[:1000]
            if "consumed" in fields:
                fields["consumed"] = int(bool(fields["consumed"]))
            for k, v in fields.items():
                setattr(row, k, v)
            if fields.get("status") in TERMINAL:
                row.finished_at = datetime.now(UTC)
            return _run(row)

    def last_window_end(self, job_id: str) -> float:
        """Where the next run's sample window starts: the end of the last one that trained."""
        with Session(self.engine) as s:
            until = s.scalar(select(RunRow.until).where(
                RunRow.job_id == job_id, RunRow.kind == "run", RunRow.consumed == 1,
                RunRow.status != "running").order_by(RunRow.id.desc()).limit(1))
            return float(until or 0.0)

    def get(self, run_id: str) -> Run:
        with Session(self.engine) as s:
            return _run(self._row(s, run_id))

    def runs(self, job_id: str | None = None, kind: str | None = None,
             limit: int | None = None) -> list[Run]:
        """Newest first."""
        with Session(self.engine) as s:
            q = select(RunRow).order_by(RunRow.id.desc())
            if job_id:
                q = q.where(RunRow.job_id == job_id)
            if kind:
                q = q.where(RunRow.kind == kind)
            if limit:
                q = q.limit(limit)
            return [_run(r) for r in s.scalars(q)]

    def status_counts(self) -> dict[tuple[str, str], int]:
        """(job, status) -> number of runs (kind ``run``), for metrics."""
        from sqlalchemy import func

        with Session(self.engine) as s:
            rows = s.execute(select(RunRow.job_id, RunRow.status, func.count())
                             .where(RunRow.kind == "run")
                             .group_by(RunRow.job_id, RunRow.status)).all()
        return {(job, status): int(n) for job, status, n in rows}

    def record_event(self, job_id: str, status: str, reason: str,
                     scheduled_at: datetime | None = None) -> Run:
        """A scheduler event (missed run, failed job) as a finished row of kind ``event``."""
        now = datetime.now(UTC)
        with Session(self.engine) as s, s.begin():
            row = RunRow(run_id=uuid.uuid4().hex, kind="event", job_id=job_id,
                         trigger="scheduler", status=status, step="event",
                         started_at=scheduled_at or now, finished_at=now,
                         reason=reason[:1000], detail={})
            s.add(row)
            s.flush()
            return _run(row)

    @staticmethod
    def _row(s: Session, run_id: str) -> RunRow:
        row = s.scalar(select(RunRow).where(RunRow.run_id == run_id))
        if row is None:
            raise KeyError(f"no run {run_id}")
        return row

    # --- update reports
    def add_report(self, report: UpdateReport) -> None:
        """Store a report; past ``MAX_REPORTS`` rows the oldest go (a chatty device cannot
        grow the database without bound)."""
        with Session(self.engine) as s, s.begin():
            row = ReportRow(device=report.device, model_id=report.model_id,
                            version=report.version, status=report.status,
                            reason=report.reason, detail=report.detail, time=report.time)
            s.add(row)
            s.flush()
            if row.id % 1000 == 0:
                s.execute(delete(ReportRow).where(ReportRow.id <= row.id - MAX_REPORTS))
        with self.reports_changed:
            self.reports_changed.notify_all()

    def reports(self, model_id: str, version: int) -> dict[str, ReportRow]:
        """The last report of each device for one update (terminal ones win)."""
        out: dict[str, ReportRow] = {}
        with Session(self.engine) as s:
            for row in s.scalars(select(ReportRow).where(
                    ReportRow.model_id == model_id, ReportRow.version == version)
                    .order_by(ReportRow.id)):
                s.expunge(row)
                prev = out.get(row.device)
                if prev is None or row.status in ("applied", "rejected", "rolled_back") or \
                        prev.status not in ("applied", "rejected", "rolled_back"):
                    out[row.device] = row
        return out
