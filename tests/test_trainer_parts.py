"""The trainer daemon's shape: every attribute of ``TrainerService`` is declared in
``__init__``, its parts share one start/stop interface (cloud_trainer/subsystem.py), and
``Subsystems`` stops them in reverse order even when one fails to stop."""

from __future__ import annotations

import ast
import inspect
import logging

import pytest
from trainer_helpers import trainer_toml

from cloud_trainer.subsystem import Managed, Subsystem, Subsystems


def test_every_service_attribute_is_declared_in_init(tmp_path) -> None:
    from cloud_trainer import service
    from cloud_trainer.trainer_config import load_trainer_config

    tree = ast.parse(inspect.getsource(service.TrainerService))
    assigned = {t.attr for node in ast.walk(tree)
                for t in (node.targets if isinstance(node, ast.Assign)
                          else [node.target] if isinstance(node, ast.AnnAssign) else [])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                and t.value.id == "self"}
    assert len(assigned) > 20  # the walk found the assignments
    svc = service.TrainerService(load_trainer_config(trainer_toml(tmp_path, 1883)))
    assert assigned - set(vars(svc)) == set()
    assert not hasattr(service, "_ACTIVE")


def test_the_parts_share_the_start_stop_interface() -> None:
    from cloud_trainer.ingest.ingestor import Ingestor
    from cloud_trainer.metrics import MetricsEndpoint
    from cloud_trainer.plan.adaptive import CutAdapter
    from cloud_trainer.scheduler import JobScheduler
    from cloud_trainer.serve.console.server import ConsoleServer
    from cloud_trainer.serve.split import SplitServer
    from cloud_trainer.storage.leader import LeaderLock

    for cls in (ConsoleServer, Ingestor, MetricsEndpoint, CutAdapter, JobScheduler,
                SplitServer, LeaderLock, Managed):
        assert issubclass(cls, Subsystem), cls


def test_parts_stop_in_reverse_and_a_failing_stop_stops_no_other(
        caplog: pytest.LogCaptureFixture) -> None:
    events: list[str] = []

    def part(name: str, fail: bool = False) -> Managed:
        def stop() -> None:
            events.append(f"stop {name}")
            if fail:
                raise OSError(f"{name} would not stop")
        return Managed(lambda: events.append(f"start {name}"), stop)

    parts = Subsystems()
    parts.start("ingest", part("ingest"))
    parts.start("console", part("console", fail=True))
    parts.start("scheduler", part("scheduler"))
    assert parts.names() == ["ingest", "console", "scheduler"]
    with caplog.at_level(logging.ERROR, logger="cloud_trainer.subsystem"):
        parts.stop_all()
    assert events == ["start ingest", "start console", "start scheduler",
                      "stop scheduler", "stop console", "stop ingest"]
    assert "stopping console failed" in caplog.text
    parts.stop_all()  # nothing left: stops nothing twice
    assert len(events) == 6 and parts.names() == []


def test_a_part_whose_start_failed_halfway_is_still_stopped() -> None:
    stopped: list[str] = []

    def boom() -> None:
        raise OSError("port in use")

    parts = Subsystems()
    with pytest.raises(OSError):
        parts.start("metrics", Managed(boom, lambda: stopped.append("metrics")))
    parts.stop_all()
    assert stopped == ["metrics"]
