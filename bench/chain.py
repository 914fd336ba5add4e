"""`knet bench chain`: DEFER-style chains of agents on loopback, in one run (``effnet-lite0``
by default; ``--model`` picks another five-block zoo model).

Single process: the trained student on onnxruntime, batch 1, in a loop (the
reference). Chains: 1, 2 and 4 real `knet-agent` processes, each running a slice and
relaying its boundary over a private Mosquitto (the last publishes results), fed as fast as
the head can read; throughput is counted where the results arrive, from the first to the
last, so start-up is excluded. Each chain runs with raw fp32, DEFER's codec (zfp reversible
+ LZ4: ``defer``) and knet's default (``uint8+lz4``) on its links, and the bytes per
inference on the relay topics are counted. Stages are pinned to CPUs round-robin
(``sched_setaffinity``): on a 2-core machine four stages share two cores, so a longer chain
cannot add compute here, it can only show the relay's cost.

Then the planner: the machine's own BenchRecord for every node, a loopback link measured by
a probe (RTT of a small message, bandwidth of 256 kB messages through the broker), block 5
pinned to a second node so the plan must cut; the chosen plan is deployed as a chain and
its per-input latency measured at a low rate (no queueing) against the prediction.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.wire.topics import TopicError, TopicKind, Topics
from bench.report import command_line, console, print_table, write_json

REPO = Path(__file__).resolve().parent.parent
FLEET = "bench"
CHAINS = {1: [(1, 5)], 2: [(1, 2), (3, 5)], 4: [(1, 1), (2, 2), (3, 3), (4, 5)]}
CODECS = ("raw", "defer", "uint8+lz4")


class Watcher:
    """Results and relay messages as they arrive (wall-clock arrival, payload)."""

    def __init__(self, port: int) -> None:
        from agent.mqtt.client import make_client
        from agent.mqtt.endpoint import MqttEndpoint

        self.results: list[tuple[float, dict[str, Any]]] = []
        self.relay_bytes: dict[str, list[int]] = {}
        self.stats_from: set[str] = set()
        self.cond = threading.Condition()
        self.topics = Topics(FLEET)
        self.client = make_client(MqttEndpoint(port=port))
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"knet/v1/{FLEET}/#", 1)
        self.client.start()
        self.client.wait_subscribed([f"knet/v1/{FLEET}/#"], 10)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.time()
        try:
            topic = self.topics.parse(msg.topic)
        except TopicError:
            return
        device = str(topic.device)
        with self.cond:
            if topic.kind is TopicKind.RESULT:
                self.results.append((now, json.loads(msg.payload)))
            elif topic.kind is TopicKind.CHAIN:
                self.relay_bytes.setdefault(device, []).append(len(msg.payload))
            elif topic.kind is TopicKind.STATS:
                self.stats_from.add(device)
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self), timeout)

    def reset(self) -> None:
        with self.cond:
            self.results.clear()
            self.relay_bytes.clear()
            self.stats_from.clear()

    def close(self) -> None:
        self.client.stop()


def _stage_dirs(full_dir: Path, root: Path, slices: list[tuple[int, int]]) -> list[Path]:
    from agent.infer.manifest import PartitionManifest

    full = PartitionManifest.load(full_dir / "manifest.json")
    dirs = []
    for i, (first, last) in enumerate(slices):
        d = root / f"model-{i}"
        d.mkdir(parents=True, exist_ok=True)
        part = full.slice(first, last)
        for b in part.blocks:
            shutil.copy2(full_dir / b.file, d / b.file)
        part.dump(d / "manifest.json")
        dirs.append(d)
    return dirs


def _config(path: Path, i: int, port: int, model: Path, npz: Path, codec: str,
            rate_hz: float) -> Path:
    source = (f'kind = "npz"\npath = "{npz}"\nrate_hz = {rate_hz}' if i == 0 else
              f'kind = "upstream"\ndevice = "stage-{i - 1}"')
    path.write_text(f"""[device]
id = "stage-{i}"
fleet = "{FLEET}"
state_dir = "{path.parent}/state-{i}"
cache_dir = "{path.parent}/cache-{i}"
[model]
manifest = "{model}/manifest.json"
profile = "x86-dev"
[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min_delay = 0.1
reconnect_max_delay = 0.5
[source]
{source}
[uplink]
enabled = false
[metrics]
stats_interval_s = 0.5
[chain]
enabled = true
codec = "{codec}"
""")
    return path


def _start(config: Path, cpu: int | None) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(config),
                             "--log-level", "WARNING"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=pin)


def run_chain(watcher: Watcher, port: int, full_dir: Path, slices: list[tuple[int, int]],
              codec: str, x: np.ndarray, *, rate_hz: float = 0.0,
              timeout: float = 300.0) -> dict[str, Any]:
    """One chain, start to finish; throughput and latency at the result topic."""
    cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="knet-chain-") as tmp:
        root = Path(tmp)
        np.savez(root / "frames.npz", x=x)
        dirs = _stage_dirs(full_dir, root, slices)
        cfgs = [_config(root / f"stage-{i}.toml", i, port, d, root / "frames.npz", codec,
                        rate_hz) for i, d in enumerate(dirs)]
        watcher.reset()
        procs = []
        try:
            for i in range(len(cfgs) - 1, 0, -1):  # downstream first: subscribed before data
                procs.append(_start(cfgs[i], cpus[i % len(cpus)] if len(cpus) > 1 else None))
            names = {f"stage-{i}" for i in range(1, len(cfgs))}
            if not watcher.wait(lambda w: names <= w.stats_from, 60):
                raise RuntimeError(f"stages {names - watcher.stats_from} did not start")
            procs.append(_start(cfgs[0], cpus[0] if len(cpus) > 1 else None))
            if not watcher.wait(lambda w: len(w.results) >= len(x), timeout):
                raise RuntimeError(f"{len(watcher.results)}/{len(x)} results in {timeout} s")
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        arrivals = [t for t, _r in watcher.results]
        latency = [t - r["t0"] for t, r in watcher.results]
        order = [r["origin"][2] for _t, r in watcher.results]
        span = arrivals[-1] - arrivals[0]
        relay = {d: float(np.mean(v)) for d, v in sorted(watcher.relay_bytes.items())}
        return {"stages": len(slices), "slices": slices, "codec": codec,
                "results": len(order), "in_order": order == sorted(order),
                "fps": (len(order) - 1) / span if span > 0 else float("nan"),
                "latency_p50_s": statistics.median(latency),
                "latency_p95_s": float(np.percentile(latency, 95)),
                "bytes_per_inference": float(sum(relay.values())), "relay_bytes": relay}


def probe_link(port: int, n: int = 40, size: int = 256 * 1024) -> tuple[float, float]:
    """(RTT seconds of a small message, bytes/s of large ones) through the broker."""
    from agent.mqtt.client import make_client
    from agent.mqtt.endpoint import MqttEndpoint

    got: list[float] = []
    cond = threading.Condition()
    c = make_client(MqttEndpoint(port=port))

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        with cond:
            got.append(time.perf_counter())
            cond.notify_all()

    c.on_message = on_message
    c.start()
    if not c.wait_connected(10):
        raise ConnectionError(f"no broker on port {port}")
    c.subscribe_and_wait("probe/#", 10)
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        k = len(got)
        c.publish("probe/small", b"x" * 64, qos=1)
        with cond:
            cond.wait_for(lambda k=k: len(got) > k, 5)
        rtts.append(got[-1] - t0)
    payload = bytes(size)
    got.clear()
    t0 = time.perf_counter()
    for _ in range(n):
        c.publish("probe/big", payload, qos=1)
    with cond:
        cond.wait_for(lambda: len(got) >= n, 30)
    bw = n * size / (got[-1] - t0)
    c.stop()
    return statistics.median(rtts), bw


def plan_and_measure(watcher: Watcher, port: int, full_dir: Path, x: np.ndarray,
                     record: Any) -> dict[str, Any]:
    from cloud_trainer.plan.costs import Overrides, build_problem
    from cloud_trainer.plan.network import NetworkConfig
    from cloud_trainer.plan.report import describe
    from cloud_trainer.plan.solver import solve

    rtt, bw = probe_link(port)
    result_hop = rtt / 2 + (record.spool_append_s or 0.0)
    # Calibration, from a different configuration than the one predicted: one agent running
    # the whole model at a low rate. What its latency has beyond the blocks and the result
    # hop is the agent pipeline's own per-input cost (thread hand-offs, bookkeeping).
    one = run_chain(watcher, port, full_dir, CHAINS[1], CODECS[-1], x, rate_hz=10.0)
    compute = sum(b.median_s for b in record.blocks)
    agent_overhead = max(0.0, one["latency_p50_s"] - result_hop - compute)

    def network(overhead: float) -> NetworkConfig:
        return NetworkConfig.model_validate({
            "mqtt_overhead_bytes": 200,
            "nodes": [{"name": name, "profile": "x86-dev", "device": record.device,
                       "overhead_s": overhead} for name in ("head", "tail")],
            "links": [{"from": "head", "to": "tail", "bandwidth_mbps": bw * 8 / 1e6,
                       "rtt_ms": rtt * 1e3}],
            "constraints": {"min_device_blocks": 1, "accuracy_budget": 1.0,
                            "codecs": list(CODECS)},
        })

    pin = Overrides(pins=((record.num_blocks, "tail"),))
    problem, _ = build_problem(network(0.0), [record], record.model_id, pin)
    best = solve(problem, "latency", top=1)[0]
    cal_problem, _ = build_problem(network(agent_overhead), [record], record.model_id, pin)
    cal = solve(cal_problem, "latency", top=1)[0]
    slices = [(s.first, s.last) for s in best.slices]
    codec = problem.codec_names[best.cuts[0].codec]
    measured = run_chain(watcher, port, full_dir, slices, codec, x, rate_hz=10.0)
    # the measured path also spools the result and carries it to the watcher: one more
    # spool append and one more small hop than the plan (whose output stays on its node)
    predicted = best.metrics["latency_s"]
    corrected = measured["latency_p50_s"] - result_hop
    cal_pred = evaluate_as(cal_problem, best)
    return {"probe_rtt_s": rtt, "probe_bandwidth_Bps": bw,
            "spool_append_s": record.spool_append_s, "plan": describe(problem, best),
            "slices": slices, "codec": codec, "predicted_latency_s": predicted,
            "measured_latency_p50_s": measured["latency_p50_s"],
            "measured_minus_result_hop_s": corrected,
            "error_pct": (corrected - predicted) / predicted * 100.0,
            "agent_overhead_s": agent_overhead,
            "calibrated_plan_same": cal.key() == best.key(),
            "calibrated_predicted_latency_s": cal_pred,
            "calibrated_error_pct": (corrected - cal_pred) / cal_pred * 100.0,
            "calibration_run": one, "run": measured}


def evaluate_as(problem: Any, plan: Any) -> float:
    """The latency ``problem`` predicts for ``plan`` (the same placement and codecs)."""
    from cloud_trainer.plan.solver import Plan, evaluate

    return float(evaluate(problem, Plan(plan.slices, plan.cuts)).metrics["latency_s"])


def single_process_fps(full_dir: Path, x: np.ndarray, passes: int = 3) -> float:
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner

    runner = BlockRunner(PartitionManifest.load(full_dir / "manifest.json"), full_dir,
                         load_profile("x86-dev"))
    runner.warmup(5)
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(len(x)):
            runner.run(x[i:i + 1])
        rates.append(len(x) / (time.perf_counter() - t0))
    return statistics.median(rates)


def run_chain_bench(frames: int = 300, plan_frames: int = 60, json_path: Path | None = None,
                    stages: tuple[int, ...] = (1, 2, 4), codecs: tuple[str, ...] = CODECS,
                    seed: int = 0, model: str = "effnet-lite0") -> dict[str, Any]:
    from agent.infer.blockbench import measure
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner
    from broker.launcher import Mosquitto
    from cloud_trainer.models.export import export_for_profile
    from cloud_trainer.training.train import model_inputs

    x = model_inputs(model, frames, seed=seed)
    with tempfile.TemporaryDirectory(prefix="knet-bench-chain-") as tmp:
        full_dir = Path(tmp) / "full"
        export_for_profile(model, "x86-dev", full_dir, seed=seed)
        base = single_process_fps(full_dir, x)
        runner = BlockRunner(PartitionManifest.load(full_dir / "manifest.json"), full_dir,
                             load_profile("x86-dev"))
        record = measure(runner, x[:16], device="local", codecs=codecs, repeats=30,
                         spool_dir=Path(tmp) / "spool-probe")
        rows = []
        with Mosquitto(Path(tmp) / "broker") as broker:
            watcher = Watcher(broker.port)
            try:
                for n in stages:
                    for codec in (codecs if n > 1 else codecs[-1:]):
                        r = run_chain(watcher, broker.port, full_dir, CHAINS[n], codec, x)
                        r["ratio_vs_single_process"] = r["fps"] / base
                        rows.append(r)
                        console.print(f"[dim]{n} stage(s), {codec}: {r['fps']:.0f}/s[/dim]")
                planned = plan_and_measure(watcher, broker.port, full_dir, x[:plan_frames],
                                           record)
            finally:
                watcher.close()
    print_table(f"{model} chains on loopback, {frames} frames; single process "
                f"{base:.0f} inferences/s",
                ["stages", "link codec", "inferences/s", "× single process",
                 "latency p50 ms", "p95 ms", "bytes/inference (all links)", "in order"],
                [(r["stages"], r["codec"] if r["stages"] > 1 else "-", r["fps"],
                  r["ratio_vs_single_process"], r["latency_p50_s"] * 1e3,
                  r["latency_p95_s"] * 1e3, r["bytes_per_inference"], str(r["in_order"]))
                 for r in rows])
    p = planned
    print_table("planner: predicted vs measured latency of its plan (block 5 pinned to a "
                "second node; 10 inputs/s)",
                ["plan", "codec", "predicted ms", "measured p50 ms", "minus result hop ms",
                 "error %", "agent overhead ms (calibrated)", "calibrated predicted ms",
                 "calibrated error %"],
                [(" | ".join(f"{a}-{b}" for a, b in p["slices"]), p["codec"],
                  p["predicted_latency_s"] * 1e3, p["measured_latency_p50_s"] * 1e3,
                  p["measured_minus_result_hop_s"] * 1e3, p["error_pct"],
                  p["agent_overhead_s"] * 1e3, p["calibrated_predicted_latency_s"] * 1e3,
                  p["calibrated_error_pct"])])
    result = {"model": model, "frames": frames, "single_process_fps": base, "chains": rows,
              "planner": planned, "cpus": sorted(os.sched_getaffinity(0))}
    write_json(json_path, "chain", command_line(), result)
    return result
