"""Staged rollout: a canary group first, the rest only when the canaries report success.

Stage 1 publishes the signed manifest retained with ``Targets.devices`` = the canary group;
devices outside it ignore it. The trainer then waits for each canary's ``UpdateReport`` on
its ``update`` topic (``agent/update_report.py``): ``applied`` is a success, ``rejected`` or
``rolled_back`` a failure, and silence until ``success_timeout_s`` a failure too. A device
whose birth already announces the new version counts as applied (its report may predate a
trainer restart). When at least ``required_success_ratio`` of the canaries succeeded, stage
2 republishes the manifest for the whole group (the job's profiles/devices, or everyone);
otherwise the rollout stops, the previously published manifest is restored as the retained
one (devices that joined later must not pick up the failed version) and the reason, naming
the devices and their report reasons, goes into the registry.

Only changed blocks are pushed: the manifest names every block by sha256, the publisher
pushes the shas its last manifest did not have, and devices fetch only what they lack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.update_manifest import Targets
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.fleet import FleetTable
from cloud_trainer.runs import RunLog
from cloud_trainer.trainer_config import JobSection, RolloutSection

log = logging.getLogger(__name__)


class RolloutInterrupted(KnetTrainerError):
    """The trainer is stopping mid-rollout: the run stays open and is resumed later."""


Publish = Callable[[Targets, str], None]  # (targets, stage) -> publish the signed manifest


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
                   stop: Callable[[], bool] = lambda: False) -> RolloutResult:
    """Canary → wait → everyone; ``restore`` puts the previous manifest back on failure."""
    t0 = time.monotonic()
    final = group_targets(job)
    eligible = eligible_devices(fleet, job, model_id)
    if not settings.enabled or (not eligible and not settings.canary_devices):
        why = "rollout disabled" if not settings.enabled else "no device of the group online"
        publish(final, "all")
        log.info("%s v%d published to the whole group (%s: no canary stage)", model_id,
                 version, why)
        return RolloutResult(ok=True, canary=[], stages=["all"], reason=why,
                             seconds=round(time.monotonic() - t0, 3))
    canary = pick_canary(settings, eligible)
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
        publish(final, "all")
        result.ok = True
        result.stages.append("all")
        result.reason = f"canary {len(ok)}/{len(canary)} applied; published to the group"
        log.info("%s v%d: %s", model_id, version, result.reason)
    result.seconds = round(time.monotonic() - t0, 3)
    return result
