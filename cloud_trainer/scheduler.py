"""The trainer daemon's job scheduler: an APScheduler 3.x ``BackgroundScheduler`` whose jobs
live in an ``SQLAlchemyJobStore`` (SQLite in the state directory, or the shared PostgreSQL),
one worker thread, ``coalesce``/``max_instances=1``/per-job ``misfire_grace_time``;
listeners record missed and failed runs in the run log.

The job store keeps a *reference* to each job's function, so the function is module-level
(``scheduled_run``) and its stored arguments are only the job id. The service that runs the
job is not looked up in a process-wide global: this scheduler's executor hands it to each
run as it submits it, so the stored job never holds it and two services in one process
(tests, a run-now beside a daemon) each run their own jobs.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.exc import SQLAlchemyError

from cloud_trainer.release.runs import RunLog
from cloud_trainer.trainer_config import JobSection, TrainerConfig

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)


class JobRunner(Protocol):
    """What runs a job: the trainer service (``TrainerService.run_job``)."""

    def run_job(self, job_id: str, trigger: str = "manual") -> object: ...


def scheduled_run(job_id: str, runner: JobRunner | None = None) -> None:
    """The job function (module-level so the job store can reference it); ``runner`` is
    added by the scheduler's executor at each run, never stored."""
    if runner is None:
        raise RuntimeError(f"job {job_id}: run outside a trainer's scheduler")
    runner.run_job(job_id, trigger="schedule")


class _WithRunner:
    """A submitted job as its run sees it: the stored job, with the runner in its kwargs."""

    def __init__(self, job: Job, runner: JobRunner) -> None:
        self._job = job
        self.kwargs = {**job.kwargs, "runner": runner}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def __str__(self) -> str:
        return str(self._job)


class _RunnerExecutor(ThreadPoolExecutor):
    """One worker thread that runs each job against ``runner``."""

    def __init__(self, runner: JobRunner) -> None:
        super().__init__(1)
        self._runner = runner

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        super()._do_submit_job(_WithRunner(job, self._runner), run_times)


def make_trigger(job: JobSection) -> CronTrigger | IntervalTrigger:
    if job.cron is not None:
        return CronTrigger.from_crontab(job.cron, timezone=UTC)
    return IntervalTrigger(seconds=job.interval_s, timezone=UTC)


class JobScheduler:
    """The configured jobs on the job store, run by ``runner`` (start/stop: a Subsystem)."""

    def __init__(self, config: TrainerConfig, runs: RunLog, runner: JobRunner,
                 engine: Engine | None = None) -> None:
        self.config = config
        self.runs = runs
        store = (SQLAlchemyJobStore(engine=engine) if engine is not None
                 else SQLAlchemyJobStore(url=f"sqlite:///{config.jobs_db}"))
        self._sched = BackgroundScheduler(
            jobstores={"default": store}, executors={"default": _RunnerExecutor(runner)},
            job_defaults={"coalesce": True, "max_instances": 1}, timezone=UTC)
        self._sched.add_listener(self._on_event,
                                 EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES)

    def start(self) -> JobScheduler:
        """Read the stored jobs (paused), reconcile them with the configuration, run."""
        sched = self._sched
        sched.start(paused=True)  # read the stored jobs before anything can fire
        try:
            self._reconcile()
            sched.resume()
        except BaseException:  # a half-started scheduler must not keep its thread
            self.stop()
            raise
        for j in sched.get_jobs():
            log.info("job %s: %s, next run %s", j.id, j.trigger, j.next_run_time)
        return self

    def _reconcile(self) -> None:
        """Drop the jobs no longer configured; (re)add the others, each keeping its next
        run time when its trigger did not change."""
        sched = self._sched
        wanted = set(self.config.job_ids)
        for stored in sched.get_jobs():
            if stored.id not in wanted:
                log.info("job %s is no longer configured: removed from the job store",
                         stored.id)
                sched.remove_job(stored.id)
        for job in self.config.jobs:
            trigger = make_trigger(job)
            stored = sched.get_job(job.id)
            kwargs: dict[str, Any] = {}
            if stored is not None and str(stored.trigger) == str(trigger) and \
                    stored.next_run_time is not None:
                kwargs["next_run_time"] = stored.next_run_time  # keep its place in time
            sched.add_job(scheduled_run, trigger, args=[job.id], id=job.id,
                          name=f"retrain {job.model}", replace_existing=True,
                          misfire_grace_time=job.misfire_grace_s, coalesce=True,
                          max_instances=1, **kwargs)

    def stop(self) -> None:
        """Stop firing (a running job finishes on its own thread); idempotent."""
        # Shutting down: whatever APScheduler raises (not running, a store error), the
        # daemon's next steps must run.
        with contextlib.suppress(Exception):
            self._sched.shutdown(wait=False)

    def get_job(self, job_id: str) -> Job | None:
        return self._sched.get_job(job_id)

    def run_now(self, job_id: str) -> None:
        """Move the job's next run time to now (APScheduler's JobLookupError if unknown)."""
        self._sched.modify_job(job_id, next_run_time=datetime.now(UTC))

    def _on_event(self, event: JobEvent) -> None:
        when = getattr(event, "scheduled_run_time", None)
        if event.code == EVENT_JOB_MISSED:
            status, reason = "missed", f"run due at {when} missed its grace time"
        elif event.code == EVENT_JOB_ERROR:
            status, reason = "failed", f"job raised {event.exception!r}"
        else:
            status, reason = "skipped", "the previous run was still going (max_instances=1)"
        log.warning("job %s: %s", event.job_id, reason)
        with contextlib.suppress(SQLAlchemyError):  # e.g. locked: the warning above stays
            self.runs.record_event(event.job_id, status, reason,
                                   when if isinstance(when, datetime) else None)
