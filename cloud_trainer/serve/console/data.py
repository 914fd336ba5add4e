"""What each page shows, as plain JSON-ready dicts, read from the running trainer.

One function per page, shared by the HTML pages, the JSON API and ``knet fleet``, so the
three never disagree. Everything is read-only here; actions live in ``actions.py``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_trainer.release.registry import RegistryError
from cloud_trainer.release.runs import ReportRow
from cloud_trainer.serve.console.history import StatsHistory

if TYPE_CHECKING:
    from cloud_trainer.service import TrainerService

TREND_POINTS = 60
STALE_STATS_S = 30.0  # stats older than this are not a current rate


def ago(t: float | None, now: float) -> str:
    """'12 s ago' / '3 min ago' / '2 h ago'; '–' when never."""
    if t is None:
        return "–"
    d = max(0.0, now - t)
    if d < 90:
        return f"{d:.0f} s ago"
    if d < 5400:
        return f"{d / 60:.0f} min ago"
    return f"{d / 3600:.1f} h ago"


def last_reports(svc: TrainerService, device: str | None = None,
                 limit: int = 50) -> list[dict[str, Any]]:
    """Update reports, newest first (all devices, or one)."""
    with Session(svc.runs.engine) as s:
        q = select(ReportRow).order_by(ReportRow.id.desc()).limit(limit)
        if device is not None:
            q = q.where(ReportRow.device == device)
        return [{"device": r.device, "model_id": r.model_id, "version": r.version,
                 "status": r.status, "reason": r.reason, "detail": r.detail, "time": r.time}
                for r in s.scalars(q)]


def _last_outcome(svc: TrainerService) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in last_reports(svc, limit=500):
        out.setdefault(r["device"], r)
    return out


def fleet(svc: TrainerService, history: StatsHistory,
          now: float | None = None) -> list[dict[str, Any]]:
    """One row per device the trainer has heard of."""
    now = time.time() if now is None else now
    outcomes = _last_outcome(svc)
    rows = []
    for info in svc.fleet.devices():
        pts = history.points(info.device)[-TREND_POINTS:]
        last = pts[-1] if pts else None
        # Rates describe a running device: a stopped one's last stats are history.
        live = last if last and info.online and now - last.t < STALE_STATS_S else None
        part = info.partition or {}
        rows.append({
            "device": info.device, "state": info.state, "state_at": info.state_at,
            "since": ago(info.state_at, now), "last_seen": info.last_seen,
            "profile": info.profile, "model_id": info.model_id,
            "model_version": info.model_version, "agent_version": info.agent_version,
            "partition": (f"blocks {part.get('first')}–{part.get('last')} of "
                          f"{part.get('num_blocks')}") if part else None,
            "blocks": {k: v[:10] for k, v in sorted(info.block_versions.items())},
            "fps": live.fps if live else None,
            "bytes_out_per_s": live.bytes_out_per_s if live else None,
            "spool_records": last.spool_records if last else None,
            "stats_at": last.t if last else None,
            "last_update": outcomes.get(info.device),
            "accuracy_trend": [p.accuracy for p in pts],
            "confidence_trend": [p.confidence for p in pts],
        })
    return rows


def device(svc: TrainerService, history: StatsHistory, device_id: str) -> dict[str, Any] | None:
    info = svc.fleet.get(device_id)
    if info is None:
        return None
    row = next(r for r in fleet(svc, history) if r["device"] == device_id)
    row["birth"] = info.birth
    row["providers"] = info.providers
    row["session"] = info.session
    row["history"] = history.to_json(device_id)
    row["updates"] = last_reports(svc, device_id)
    return row


def _block_bytes(svc: TrainerService, sha: str) -> int | None:
    path = svc.registry.blocks_dir / f"{sha}.pt"
    try:
        return path.stat().st_size
    except OSError:
        return None


def models(svc: TrainerService) -> list[dict[str, Any]]:
    """Every version, newest first, with what changed against its parent."""
    versions = svc.registry.versions()
    by_key = {(v.model_id, v.version): v for v in versions}
    out = []
    for v in reversed(versions):
        parent = by_key.get((v.model_id, v.parent)) if v.parent is not None else None
        changed = v.changed_blocks(parent)
        gate = v.scores.get("gate") or {}
        out.append({
            "model_id": v.model_id, "version": v.version, "parent": v.parent,
            "status": v.status, "reason": v.reason, "created_at": v.created_at.isoformat(),
            "run_id": v.info.get("run_id"), "rollback_of": v.info.get("rollback_of"),
            "changed_blocks": changed,
            "changed_bytes": sum(_block_bytes(svc, v.blocks[i]) or 0 for i in changed),
            "total_bytes": sum(_block_bytes(svc, s) or 0 for s in v.blocks.values()),
            "gate": {k: gate.get(k) for k in ("passed", "metric", "candidate_score",
                                              "deployed_score", "delta", "samples")}
            if gate else None,
            "per_device": gate.get("per_device") or {},
            "rollout": v.scores.get("rollout"),
        })
    return out


def _iso(d: datetime | None) -> str | None:
    return d.astimezone(UTC).isoformat(timespec="seconds") if d else None


def runs(svc: TrainerService) -> dict[str, Any]:
    """Jobs with their next run, the recent runs and scheduler events."""
    history = svc.runs.runs(limit=100)
    jobs = []
    for job in svc.config.jobs:
        stored = svc.scheduler.get_job(job.id) if svc.scheduler is not None else None
        mine = [r for r in history if r.job_id == job.id]
        last = next((r for r in mine if r.kind == "run"), None)
        jobs.append({
            "id": job.id, "model": job.model,
            "trigger": str(stored.trigger) if stored else "not scheduled",
            "next_run": _iso(stored.next_run_time) if stored else None,
            "last_status": last.status if last else None,
            "last_version": last.version if last else None,
            "last_reason": last.reason if last else "",
            "running": last.step if last and last.status == "running" else None,
            "missed": sum(r.status == "missed" for r in mine if r.kind == "event"),
            "failed": sum(r.status == "failed" for r in mine),
        })
    recent = [{"run_id": r.run_id, "kind": r.kind, "job_id": r.job_id, "model_id": r.model_id,
               "trigger": r.trigger, "status": r.status, "step": r.step,
               "version": r.version, "reason": r.reason, "started_at": _iso(r.started_at),
               "finished_at": _iso(r.finished_at),
               "rollout": _rollout(svc, r.model_id, r.version)}
              for r in history[:30]]
    pause = svc.retrainer.pause
    return {"jobs": jobs, "runs": recent, "paused": pause.info(),
            "holding": pause.holding.is_set()}


def _rollout(svc: TrainerService, model_id: str, version: int | None) -> dict[str, Any] | None:
    """Canary and group state of a run's version: the recorded result, else live reports."""
    if not model_id or version is None:
        return None
    try:
        v = svc.registry.get(model_id, version)
    except RegistryError:  # a run whose version is gone: no rollout to show
        return None
    done = v.scores.get("rollout")
    if done:
        return {"stages": done.get("stages"), "canary": done.get("canary"),
                "succeeded": done.get("succeeded"), "failed": done.get("failed"),
                "ok": done.get("ok")}
    reports = svc.runs.reports(model_id, version)
    if not reports:
        return None
    return {"stages": ["canary?"], "reports": {d: r.status for d, r in reports.items()}}


def drift(svc: TrainerService, history: StatsHistory) -> list[dict[str, Any]]:
    """Per device the agreement (accuracy on labelled inputs) and confidence over time."""
    out = []
    for info in svc.fleet.devices():
        pts = history.points(info.device)
        acc = [p.accuracy for p in pts if p.accuracy is not None]
        out.append({"device": info.device, "state": info.state,
                    "t": [p.t for p in pts],
                    "accuracy": [p.accuracy for p in pts],
                    "confidence": [p.confidence for p in pts],
                    "accuracy_now": acc[-1] if acc else None,
                    "accuracy_change": (acc[-1] - acc[0]) if len(acc) > 1 else None})
    return out
