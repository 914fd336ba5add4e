"""deploy/grafana/knet.json queries only metrics the code exports (agent/metrics.py and the
trainer's table, cloud_trainer/metrics.py FAMILIES, which tests/test_trainer_metrics.py holds
to a real scrape), and deploy/prometheus/prometheus.yml scrapes every job it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from agent.metrics import AgentMetrics
from cloud_trainer.metrics import FAMILIES

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_BUILTINS = {"up"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"), "summary": ("", "_sum",
                                                                            "_count")}


def exported() -> set[str]:
    """Every series name a scrape of an agent can return, from the registry's families."""
    names = set()
    for family in AgentMetrics().registry.collect():
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    for name, (kind, _help, _labels) in FAMILIES.items():
        names |= {name + s for s in SUFFIXES[kind] if s != "_created"}
    return names


def queried(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard queries nothing"
    names = set()
    for expr in exprs:
        bare = re.sub(r"\{[^}]*\}|\[[^]]*\]", "", expr)  # label matchers, ranges
        names |= set(re.findall(r"\b(knet_[a-z0-9_]+)\b", bare))
        names |= {n for n in re.findall(r"\b([a-z_]+)\b", bare) if n in PROMETHEUS_BUILTINS}
    return names


def test_every_queried_metric_is_exported() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "knet.json").read_text())
    names = queried(dashboard)
    assert len(names) >= 10
    assert any(n.startswith("knet_trainer_") for n in names)
    missing = names - exported() - PROMETHEUS_BUILTINS
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_scrape_config_feeds_the_dashboard() -> None:
    # Plain text checks (no YAML parser among the dependencies): the job the dashboard
    # selects is scraped, and every static target carries the device label it groups by.
    text = (REPO / "deploy" / "prometheus" / "prometheus.yml").read_text()
    jobs = set(re.findall(r"^\s*- job_name: ([a-z-]+)$", text, re.M))
    assert jobs == {"knet-agent", "knet-trainer"}
    agents = text.split("job_name: knet-agent")[1].split("job_name:")[0]
    targets = re.findall(r"^\s*- targets: .*$", agents, re.M)
    labels = re.findall(r"^\s*labels: \{device: [a-z0-9-]+", agents, re.M)
    assert targets and len(labels) == len(targets)
    dashboard = json.loads((REPO / "deploy" / "grafana" / "knet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for expr in exprs:
        selected = set(re.findall(r'job="([a-z-]+)"', expr))
        assert selected and selected <= jobs, expr
        trainer = [n.startswith("knet_trainer_") for n in re.findall(r"\bknet_[a-z0-9_]+", expr)]
        assert all(trainer) if selected == {"knet-trainer"} else not any(trainer), expr


def test_the_check_sees_metric_names_in_expressions() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(knet_nope_bucket{job="x"}[5m]))) + up'
    assert queried({"panels": [{"targets": [{"expr": expr}]}]}) == {"knet_nope_bucket", "up"}
    assert "knet_nope_bucket" not in exported() and "knet_frames_total" in exported()
