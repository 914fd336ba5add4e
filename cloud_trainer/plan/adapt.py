"""Re-planning when the network changes, with hysteresis (Scission's "adaptive DNNs").

``Replanner`` keeps the plan in force and, for every set of live link figures (from the
agents' ``stats["network"]``, ``agent/mqtt/netmeter.py``), solves again. It switches only when
another plan beats the current one — both priced on the *new* figures — by more than
``margin`` (relative) in ``sustain`` consecutive observations, so a blip or a link hovering
at the break-even point does not make the cut flap; moving back needs the same evidence.

Not wired yet: pushing the new plan's partition manifests to the devices through the
signed update path (``agent/update/updater.py`` swaps block weights of a fixed partition; moving a
cut also changes the chain's topology). ``Decision.plan`` is what such a push would deploy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.infer.blockbench import BenchRecord
from cloud_trainer.plan.costs import Overrides, build_problem
from cloud_trainer.plan.network import NetworkConfig
from cloud_trainer.plan.solver import Objective, Plan, evaluate, objective_value, solve

BUSY_ACKS = 20  # below this many acks in the window the achieved rate says nothing


@dataclass(frozen=True)
class LinkFigures:
    bandwidth_mbps: float | None = None  # None: keep the configured figure
    rtt_ms: float | None = None


@dataclass
class Decision:
    switched: bool
    plan: Plan
    current_value: float  # the plan in force, priced on the new figures
    best_value: float
    streak: int


def figures_from_stats(stats: Mapping[str, Any]) -> LinkFigures:
    """A device's ``stats`` → its uplink figures. The round trip is always usable; the
    achieved rate only when the link was busy (an idle device's rate is not a capacity)."""
    net = stats.get("network") or {}
    rtt = net.get("rtt_ms")
    busy = (net.get("acked_in_window") or 0) >= BUSY_ACKS
    rate = net.get("uplink_bytes_per_s") if busy else None
    return LinkFigures(bandwidth_mbps=rate * 8 / 1e6 if rate else None,
                       rtt_ms=float(rtt) if isinstance(rtt, int | float) else None)


def with_figures(net: NetworkConfig, figures: Mapping[int, LinkFigures]) -> NetworkConfig:
    """``net`` with link ``i``'s bandwidth/RTT replaced where ``figures`` has them."""
    links = []
    for i, link in enumerate(net.links):
        f = figures.get(i)
        update = {}
        if f is not None and f.bandwidth_mbps:
            update["bandwidth_mbps"] = f.bandwidth_mbps
        if f is not None and f.rtt_ms is not None:
            update["rtt_ms"] = f.rtt_ms
        links.append(link.model_copy(update=update))
    return net.model_copy(update={"links": links})


class Replanner:
    def __init__(self, net: NetworkConfig, records: Sequence[BenchRecord], model_id: str,
                 *, objective: Objective = "latency", overrides: Overrides | None = None,
                 margin: float = 0.2, sustain: int = 3) -> None:
        if not 0 <= margin < 1 or sustain < 1:
            raise ValueError("margin in [0, 1) and sustain >= 1")
        self.net, self.records, self.model_id = net, list(records), model_id
        self.objective, self.overrides = objective, overrides
        self.margin, self.sustain = margin, sustain
        problem, _ = build_problem(net, self.records, model_id, overrides)
        plans = solve(problem, objective)
        if not plans:
            raise ValueError("no plan satisfies the constraints")
        self.current = plans[0]
        self._streak = 0
        self._candidate: tuple[object, ...] | None = None

    def observe(self, figures: Mapping[int, LinkFigures]) -> Decision:
        """One observation of the links; switches the plan in force when warranted."""
        problem, _ = build_problem(with_figures(self.net, figures), self.records,
                                   self.model_id, self.overrides)
        plans = solve(problem, self.objective)
        current = evaluate(problem, Plan(self.current.slices, self.current.cuts))
        cur_value = objective_value(current, self.objective)
        if not plans:
            self._streak = 0
            return Decision(False, self.current, cur_value, float("inf"), 0)
        best = plans[0]
        better = (best.key() != self.current.key()
                  and best.value < cur_value * (1 - self.margin))
        if better and best.key() == self._candidate:
            self._streak += 1
        elif better:
            self._candidate, self._streak = best.key(), 1
        else:
            self._candidate, self._streak = None, 0
        if better and self._streak >= self.sustain:
            self.current, self._candidate, streak = best, None, self._streak
            self._streak = 0
            return Decision(True, best, cur_value, best.value, streak)
        return Decision(False, self.current, cur_value, best.value, self._streak)
