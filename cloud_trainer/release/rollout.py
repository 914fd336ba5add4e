"""Staged rollout: a canary group first, the rest only when the canaries report success.

Stage 1 publishes the signed manifest retained with ``Targets.devices`` = the canary group;
devices outside it ignore it. The trainer then waits for each canary's ``UpdateReport`` on
its ``update`` topic (``agent/wire/update_report.py``): ``applied`` is a success, ``rejected`` or
``rolled_back`` a failure, and silence until ``success_timeout_s`` a failure too. A device
whose birth already announces the new version counts as applied (its report may predate a
trainer restart). When at least ``required_success_ratio`` of the canaries succeeded, stage
2 republishes the manifest for the whole group (the job's profiles/devices, or everyone);
otherwise the rollout stops, the previously published manifest is restored as the retained
one (devices that joined later must not pick up the failed version) and the reason, naming
the devices and their report reasons, goes into the registry.

An operator can pause rollouts (``RolloutPause``, the console's Runs page): each stage then
waits for a resume before it publishes.

Only changed blocks are pushed: the manifest names every block by sha256, the publisher
pushes the shas its last manifest did not have, and devices fetch only what they lack.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.update.update_manifest import Targets
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.ingest.fleet import FleetTable
from cloud_trainer.release.runs import RunLog
from cloud_trainer.trainer_config import JobSection, RolloutSection

log = logging.getLogger(__name__)


class RolloutInterrupted(KnetTrainerError):
    """The trainer is stopping mid-rollout: the run stays open and is resumed later."""


Publish = Callable[[Targets, str], None]  # (targets, stage) -> publish the signed manifest
PAUSE_POLL_S = 1.0  # a pause set by another process (a file) is noticed this fast


class RolloutPause:
    """The operator's pause: while set, no rollout publishes its next stage.

    A file (``<state_dir>/rollout.paused``, JSON with who and when) so that it survives a
    trainer restart and a run resumed after one holds too. A rollout waiting on it keeps its
    run ``running`` at step ``publish``; stopping the trainer meanwhile interrupts the run,
    which is resumed (and holds again) later. Set in-process, it wakes the waiting rollout
    at once; set by another process, within ``PAUSE_POLL_S``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._changed = threading.Event()
        self.holding = threading.Event()  # a rollout is waiting on the pause right now

    def set(self, by: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"by": by, "since": time.time()}))
        tmp.replace(self.path)
        self._changed.set()
        log.warning("rollouts paused by %s", by)

    def clear(self, by: str = "") -> None:
        self.path.unlink(missing_ok=True)
        self._changed.set()
        log.warning("rollouts resumed%s", f" by {by}" if by else "")

    def is_set(self) -> bool:
        return self.path.exists()

    def info(self) -> dict[str, Any] | None:
        """Who paused and since when; None when not paused."""
        try:
            body = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"by": "?", "since": None}
        return body if isinstance(body, dict) else {"by": "?", "since": None}

    def hold(self, what: str, stop: Callable[[], bool]) -> None:
        """Return once not paused; RolloutInterrupted when ``stop`` says so meanwhile."""
        if not self.is_set():
            return
        log.warning("rollout paused before %s: waiting for a resume", what)
        self.holding.set()
        try:
            while self.is_set():
                if stop():
                    raise RolloutInterrupted
                self._changed.wait(PAUSE_POLL_S)
                self._changed.clear()
        finally:
            self.holding.clear()
        log.info("rollout resumed: %s", what)


@dataclass
class RolloutResult:
    ok: bool
    canary: list[str]
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # device -> why
    stages: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def eligible_devices(fleet: FleetTable, job: JobSection, model_id: str) -> list[str]:
    """Online devices of the job's group that run ``model_id`` (or have not said)."""
    out = []
    for info in fleet.devices():
        if not info.online:
            continue
        if info.model_id not in (None, model_id):
            continue
        in_group = (not job.devices and not job.profiles) or info.device in job.devices or \
            (info.profile is not None and info.profile in job.profiles)
        if in_group:
            out.append(info.device)
    return out


def pick_canary(settings: RolloutSection, eligible: Sequence[str]) -> list[str]:
    """The configured canary devices, else the first ``canary_fraction`` (sorted: stable)."""
    if settings.canary_devices:
        return list(settings.canary_devices)
    chosen = sorted(eligible)
    return chosen[: settings.canary_count(len(chosen))]


def group_targets(job: JobSection) -> Targets:
    return Targets(devices=list(job.devices), profiles=list(job.profiles))


def wait_for_reports(runs: RunLog, fleet: FleetTable, model_id: str, version: int,
                     devices: Sequence[str], timeout: float, required: float,
                     stop: Callable[[], bool] = lambda: False,
                     ) -> tuple[list[str], dict[str, str]]:
    """Block until every device reported a terminal status, the outcome is decided, or
    ``timeout`` passes; returns (succeeded, failed device -> reason)."""
    deadline = time.monotonic() + timeout
    need = required * len(devices)
    while True:
        ok, bad = _outcomes(runs, fleet, model_id, version, devices)
        pending = len(devices) - len(ok) - len(bad)
        if not pending or len(ok) + pending < need - 1e-9 or stop():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with runs.reports_changed:
            runs.reports_changed.wait(min(left, 0.5))  # also polls the fleet table
    for d in devices:
        if d not in ok and d not in bad:
            bad[d] = f"no report within {timeout:.0f} s"
    return ok, bad


def _outcomes(runs: RunLog, fleet: FleetTable, model_id: str, version: int,
              devices: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    reports = runs.reports(model_id, version)
    ok: list[str] = []
    bad: dict[str, str] = {}
    for d in devices:
        r = reports.get(d)
        info = fleet.get(d)
        if r is not None and r.status == "applied":
            ok.append(d)
        elif r is not None and r.status in ("rejected", "rolled_back"):
            bad[d] = f"{r.status}: {r.reason or '?'}" + (f" ({r.detail})" if r.detail else "")
        elif info is not None and info.model_id == model_id and info.model_version == version:
            ok.append(d)
    return ok, bad


def staged_rollout(settings: RolloutSection, job: JobSection, fleet: FleetTable,
                   runs: RunLog, model_id: str, version: int, publish: Publish,
                   restore: Callable[[], None],
                   stop: Callable[[], bool] = lambda: False,
                   pause: RolloutPause | None = None) -> RolloutResult:
    """Canary → wait → everyone; ``restore`` puts the previous manifest back on failure.
    With ``pause`` set, each stage waits for a resume before it publishes."""

    def hold(what: str) -> None:
        if pause is not None:
            pause.hold(f"{model_id} v{version} {what}", stop)

    t0 = time.monotonic()
    final = group_targets(job)
    eligible = eligible_devices(fleet, job, model_id)
    if not settings.enabled or (not eligible and not settings.canary_devices):
        why = "rollout disabled" if not settings.enabled else "no device of the group online"
        hold("to the group")
        publish(final, "all")
        log.info("%s v%d published to the whole group (%s: no canary stage)", model_id,
                 version, why)
        return RolloutResult(ok=True, canary=[], stages=["all"], reason=why,
                             seconds=round(time.monotonic() - t0, 3))
    canary = pick_canary(settings, eligible)
    hold("to the canary")
    publish(Targets(devices=canary), "canary")
    log.info("%s v%d: canary %s, waiting up to %.0f s for their reports", model_id, version,
             canary, settings.success_timeout_s)
    ok, bad = wait_for_reports(runs, fleet, model_id, version, canary,
                               settings.success_timeout_s, settings.required_success_ratio,
                               stop)
    if stop():
        raise RolloutInterrupted
    result = RolloutResult(ok=False, canary=canary, succeeded=sorted(ok), failed=bad,
                           stages=["canary"])
    ratio = len(ok) / len(canary)
    if ratio + 1e-9 < settings.required_success_ratio:
        restore()
        result.reason = (f"canary failed: {len(ok)}/{len(canary)} applied (need "
                         f"{settings.required_success_ratio:.0%}); " +
                         "; ".join(f"{d}: {why}" for d, why in sorted(bad.items())))
        log.warning("%s v%d: %s", model_id, version, result.reason)
    else:
        hold("to the group")
        publish(final, "all")
        result.ok = True
        result.stages.append("all")
        result.reason = f"canary {len(ok)}/{len(canary)} applied; published to the group"
        log.info("%s v%d: %s", model_id, version, result.reason)
    result.seconds = round(time.monotonic() - t0, 3)
    return result
