"""The partition planner: exact DP against brute force, constraints, the 50×5 case."""

from __future__ import annotations

import itertools
import time
import tomllib

import numpy as np
import pytest

from cloud_trainer.plan.solver import (
    INF,
    Cut,
    Plan,
    Problem,
    Slice,
    evaluate,
    objective_value,
    solve,
)


def random_problem(rng: np.random.Generator, N: int, T: int, S: int, *,
                   constrained: bool = True) -> Problem:
    comp = rng.uniform(0.001, 0.05, (T, N)) * rng.uniform(0.2, 3, (T, 1))
    mem = rng.uniform(1, 20, (T, N))
    allowed = np.ones((T, N), bool)
    bytes_ = rng.uniform(1e3, 2e5, (N + 1, S))
    loss = rng.uniform(0, 1, (N + 1, S))
    if constrained:
        allowed &= rng.random((T, N)) > 0.1
        bytes_[rng.random((N + 1, S)) < 0.15] = INF  # codec not eligible at a boundary
    mem_cap = rng.uniform(20, 20 * N, T) if constrained else np.full(T, INF)
    time_cap = rng.uniform(0.02, 0.1 * N, T) if constrained else np.full(T, INF)
    link_cap = rng.uniform(5e4, 3e5, T - 1) if constrained else np.full(T - 1, INF)
    return Problem(
        node_names=[f"n{t}" for t in range(T)], codec_names=[f"c{s}" for s in range(S)],
        comp=comp, mem=mem, allowed=allowed, mem_cap=mem_cap, time_cap=time_cap,
        power=rng.uniform(0.5, 10, T), bytes_=bytes_,
        enc=rng.uniform(0, 0.002, (T, N + 1, S)), dec=rng.uniform(0, 0.002, (T, N + 1, S)),
        loss=loss, bw_bps=rng.uniform(1e6, 1e8, T - 1), rtt_s=rng.uniform(0, 0.05, T - 1),
        link_cap=link_cap, overhead=float(rng.integers(0, 300)),
        min_device_blocks=int(rng.integers(0, 2)) if constrained else 0,
        send_s=rng.uniform(0, 0.002, T), node_overhead_s=rng.uniform(0, 0.003, T))


def all_plans(p: Problem):
    """Every placement: active nodes 0 = t0 < t1 < ... , cut boundaries, codec per cut."""
    N, T, S = p.n_blocks, p.n_nodes, p.n_codecs
    for m in range(1, T + 1):
        for rest in itertools.combinations(range(1, T), m - 1):
            nodes = (0, *rest)
            # node 0 may run zero blocks; every later active node runs at least one
            for cuts in itertools.combinations(range(0, N), m - 1):
                bounds = (0, *cuts, N)
                if any(bounds[i + 1] <= bounds[i] for i in range(1, m)):
                    continue
                if m > 1 and bounds[1] == N:
                    continue
                slices = tuple(Slice(nodes[i], bounds[i] + 1, bounds[i + 1]) for i in range(m))
                for codecs in itertools.product(range(S), repeat=m - 1):
                    cs = tuple(Cut(bounds[i + 1], nodes[i], nodes[i + 1], codecs[i])
                               for i in range(m - 1))
                    yield Plan(slices, cs)


def brute_force(p: Problem, objective: str) -> list[float]:
    return sorted(v for plan in all_plans(p)
                  if np.isfinite(v := objective_value(evaluate(p, plan), objective)))


@pytest.mark.parametrize("objective", ["latency", "throughput", "energy"])
def test_dp_matches_brute_force_on_random_instances(objective: str) -> None:
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(40):
        N, T, S = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        p = random_problem(rng, N, T, S, constrained=trial % 4 != 0)
        expected = brute_force(p, objective)
        plans = solve(p, objective, top=3)
        if not expected:
            assert plans == [], f"trial {trial}: DP found a plan brute force says is infeasible"
            continue
        got = [objective_value(pl, objective) for pl in plans]
        assert got[0] == pytest.approx(expected[0], rel=1e-9), f"trial {trial}"
        assert got == pytest.approx(expected[:len(got)], rel=1e-9), f"trial {trial} top-3"
        assert len(got) == min(3, len(expected))
        for pl in plans:
            assert pl.metrics["feasible"] == 1.0
            assert pl.value == pytest.approx(objective_value(pl, objective), rel=1e-9)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_fifty_blocks_five_tiers_completes(objective: str) -> None:
    """50 blocks × 5 tiers × 6 codecs: the real figure is in docs/planner.md; the bound is a
    regression guard (an accidental enumeration would take hours), not a benchmark."""
    p = random_problem(np.random.default_rng(1), 50, 5, 6, constrained=False)
    t0 = time.perf_counter()
    plans = solve(p, objective, top=1)
    elapsed = time.perf_counter() - t0
    assert plans and plans[0].metrics["feasible"] == 1.0
    assert elapsed < 5.0, f"50×5 took {elapsed:.2f} s"


# --- from records and network.toml to deployable manifests -------------------------------
NETWORK = """
mqtt_overhead_bytes = 200
[[nodes]]
name = "cam"
profile = "rpi4"
bench = "rec.json"
time_scale = 8.0
[[nodes]]
name = "edge"
profile = "jetson-orin-nano"
bench = "rec.json"
[[nodes]]
name = "cloud"
profile = "x86-dev"
bench = "rec.json"
time_scale = 0.5
[[links]]
from = "cam"
to = "edge"
bandwidth_mbps = 2
rtt_ms = 5
[[links]]
from = "edge"
to = "cloud"
bandwidth_mbps = 100
rtt_ms = 20
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    from agent_helpers import exported_digits

    from agent.infer.blockbench import measure
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner

    root = tmp_path_factory.mktemp("plan")
    model = exported_digits(root)
    runner = BlockRunner(PartitionManifest.load(model / "manifest.json"), model,
                         load_profile("x86-dev"))
    x = np.random.default_rng(0).random((6, *runner.input_shape), dtype=np.float32)
    rec = measure(runner, x, device="dev-1", codecs=("raw", "uint8+lz4", "fp16+lz4"),
                  warmup=1, repeats=5)
    rec.dump(root / "rec.json")
    (root / "network.toml").write_text(NETWORK)
    return root, model, rec


def _plan(root, *extra: str) -> tuple[int, dict]:
    import json

    from knet_cli.main import main

    out = root / "plan.json"
    out.unlink(missing_ok=True)
    rc = main(["plan", "--model", "digits", "--network", str(root / "network.toml"),
               "--json", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else {})


def test_plan_cli_ranks_plots_and_deploys_runnable_slices(planned) -> None:
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner

    root, model, _rec = planned
    rc, body = _plan(root, "--top", "4", "--plot", str(root / "plan.png"),
                     "--min-device-blocks", "1", "--forbid", "4=edge", "--deploy",
                     str(root / "deploy"), "--export", str(model), "--objective",
                     "throughput")
    assert rc == 0
    assert (root / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plans = body["plans"]
    assert 1 <= len(plans) <= 4
    values = [pl["value"] for pl in plans]
    assert values == sorted(values)
    full = PartitionManifest.load(model / "manifest.json")
    x = np.random.default_rng(3).random((2, *full.blocks[0].input_shape), dtype=np.float32)
    expected = BlockRunner(full, model, load_profile("x86-dev")).run(x)[-1]
    for rank, pl in enumerate(plans, 1):
        assert pl["slices"][0]["node"] == "cam" and pl["slices"][0]["last"] >= 1
        assert not any(s["node"] == "edge" and s["first"] <= 4 <= s["last"]
                       for s in pl["slices"])
        # the deployed slices, chained, compute the whole model
        y = x
        for s in pl["slices"]:
            d = root / "deploy" / f"plan-{rank}" / s["node"]
            m = PartitionManifest.load(d / "manifest.json")
            assert (m.first, m.last) == (s["first"], s["last"])
            snippet = tomllib.loads((d / "agent-chain.toml").read_text())
            if len(pl["slices"]) > 1:
                assert snippet["chain"]["enabled"] is True
            prev = pl["slices"][pl["slices"].index(s) - 1]["node"] if s is not \
                pl["slices"][0] else None
            assert snippet.get("source", {}).get("device") == prev
            y = BlockRunner(m, d, load_profile("x86-dev")).run(y)[-1]
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_plan_constraints_are_respected(planned) -> None:
    root, _model, rec = planned
    n = rec.num_blocks
    rc, body = _plan(root, "--min-device-blocks", str(n))
    assert rc == 0 and body["plans"][0]["slices"] == [{"node": "cam", "first": 1, "last": n}]
    rc, body = _plan(root, "--pin", f"{n}=cloud", "--top", "10")
    assert rc == 0
    for pl in body["plans"]:
        assert pl["slices"][-1]["node"] == "cloud" and pl["slices"][-1]["last"] == n
    # no byte may leave the camera: everything stays there
    rc, body = _plan(root, "--max-upload-bytes", "cam=1", "--top", "10")
    assert rc == 0 and all(len(pl["slices"]) == 1 for pl in body["plans"])
    # impossible: all blocks pinned to the cloud but the camera must keep block 1
    rc, _ = _plan(root, "--min-device-blocks", "1", "--pin", "1=cloud")
    assert rc == 1


def test_network_file_errors_name_the_field(tmp_path) -> None:
    from agent.configfile import ConfigError
    from cloud_trainer.plan.network import load_network

    bad = NETWORK.replace('to = "edge"', 'to = "cloud"', 1)
    (tmp_path / "n.toml").write_text(bad)
    with pytest.raises(ConfigError, match="links\\[0\\] must join"):
        load_network(tmp_path / "n.toml")
    (tmp_path / "n.toml").write_text(NETWORK.replace("rtt_ms = 5", "rtt_ms = -5"))
    with pytest.raises(ConfigError, match=r"links\.0\.rtt_ms"):
        load_network(tmp_path / "n.toml")
    (tmp_path / "n.toml").write_text(NETWORK + "\n[constraints]\nbudget = 1\n")
    with pytest.raises(ConfigError, match=r"constraints\.budget: unknown key"):
        load_network(tmp_path / "n.toml")


def test_replanner_moves_the_cut_with_hysteresis(planned) -> None:
    from agent.infer.blockbench import BenchRecord
    from cloud_trainer.plan.adapt import LinkFigures, Replanner, figures_from_stats
    from cloud_trainer.plan.network import NetworkConfig

    root, _model, rec = planned
    rec = BenchRecord.load(root / "rec.json")
    net = NetworkConfig.model_validate({
        "mqtt_overhead_bytes": 200,
        "nodes": [{"name": "cam", "profile": "rpi4", "device": "dev-1", "time_scale": 200},
                  {"name": "cloud", "profile": "x86-dev", "device": "dev-1"}],
        "links": [{"from": "cam", "to": "cloud", "bandwidth_mbps": 1000, "rtt_ms": 1}],
        "constraints": {"min_device_blocks": 1},
    })
    r = Replanner(net, [rec], "digits", margin=0.2, sustain=2)
    start = r.current.key()
    assert len(r.current.slices) == 2  # a fast link: offload after block 1
    slow = {0: LinkFigures(bandwidth_mbps=0.001, rtt_ms=500)}
    fast = {0: LinkFigures(bandwidth_mbps=1000, rtt_ms=1)}
    assert not r.observe(slow).switched  # one bad reading is a blip
    assert not r.observe(fast).switched  # ... and the streak resets
    assert not r.observe(slow).switched
    d = r.observe(slow)
    assert d.switched and len(d.plan.slices) == 1  # sustained: everything on the camera
    assert d.best_value < d.current_value * 0.8
    assert not r.observe(fast).switched
    assert r.observe(fast).switched and r.current.key() == start  # and back
    assert figures_from_stats({"network": {"rtt_ms": 12.0, "uplink_bytes_per_s": 1e6,
                                           "acked_in_window": 3}}) == LinkFigures(None, 12.0)
    assert figures_from_stats({"network": {"rtt_ms": 12.0, "uplink_bytes_per_s": 1e6,
                                           "acked_in_window": 50}}).bandwidth_mbps == 8.0
    assert figures_from_stats({}) == LinkFigures(None, None)
