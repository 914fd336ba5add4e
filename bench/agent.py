"""`knet bench agent`: the full agent pipeline against bare onnxruntime, in one run.

Bare: the same exported student blocks, with the same profile's session options, on the
same inputs, batch 1, in a loop. Both replay ``distinct`` inputs round and round until
``frames`` have run (the agent with ``loop`` and ``max_frames``), so a run lasts seconds and
the fixed costs of a start and a flush do not blur the ratio. Agent: the real `knet-agent`
process (npz source → inference → encode → spool → publish to a private Mosquitto on
loopback), timed from its READY notification to its STOPPING notification (sent once the
source is finished and the broker acknowledged every message) and to its exit, with CPU time
and peak RSS from the kernel's accounting of the child. Each agent run is paired with a bare
run just before it, so machine noise that drifts over the run stays out of the ratio.

With ``batch_sizes`` the variants are "uplink every input" at each ``[uplink] batch_size``
(version-2 batch envelopes above 1), and each row adds the messages and bytes per second
the broker acknowledged and the p50/p99 delay from a sample's inference to the PUBACK of
the message that carried it (the agent's own ``stats["network"]``, last 8,192 samples,
read from its final stats message). With ``profile_dir`` one more run per variant goes
under py-spy (``bench/profile.py``), and the table of where the time went is printed.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.profile import PARTS, py_spy, summarize
from bench.report import command_line, console, print_table, write_json

# uplink policies, (every_n, max_samples_per_s); the last is docs/examples/agent.toml's
VARIANTS = {"every input": (1, 0.0), "every 10th": (10, 0.0),
            "every 10th, at most 5/s (example config)": (10, 5.0)}


def _bare_fps(step: Callable[[np.ndarray], Any], x: np.ndarray, frames: int) -> float:
    """``step`` on one input at a time, ``frames`` inputs round ``x``: no input check (the
    agent checks in its source)."""
    n = len(x)
    t0 = time.perf_counter()
    for i in range(frames):
        j = i % n
        step(x[j : j + 1])
    return frames / (time.perf_counter() - t0)


def plain_chain(manifest: Any, model_dir: Path, profile: Any) -> Callable[[np.ndarray], Any]:
    """Bare onnxruntime as a user would write it: one ``InferenceSession`` per block file,
    with the profile's session options and providers, each output fed to the next block."""
    import onnxruntime as ort

    from agent.infer.runtime import choose_providers, session_options

    opts, providers = session_options(profile), choose_providers(profile)
    chain = []
    for block in manifest.blocks:
        sess = ort.InferenceSession(str(model_dir / block.file), opts, providers=providers)
        chain.append((sess, sess.get_inputs()[0].name))

    def step(x: np.ndarray) -> Any:
        for sess, name in chain:
            x = sess.run(None, {name: x})[0]
        return x

    step(np.zeros((1, *manifest.blocks[0].input_shape), np.float32))  # warm-up
    return step


def _write_config(path: Path, port: int, manifest: Path, npz: Path, state: Path,
                  every_n: int, boundaries: list[int], codec: str,
                  max_samples_per_s: float = 0.0, frames: int | None = None,
                  batch_size: int = 1) -> None:
    limit = f"loop = true\nmax_frames = {frames}" if frames else ""
    path.write_text(f"""
[device]
id = "bench-1"
fleet = "bench"
state_dir = "{state}"
cache_dir = "{state}/cache"
[model]
manifest = "{manifest}"
profile = "x86-dev"
[mqtt]
host = "127.0.0.1"
port = {port}
[source]
kind = "npz"
path = "{npz}"
{limit}
[uplink]
every_n = {every_n}
max_samples_per_s = {max_samples_per_s}
boundaries = {boundaries}
codec = "{codec}"
batch_size = {batch_size}
[pipeline]
exit_when_done = true
[metrics]
stats_interval_s = 1.0
""")


class StatsListener:
    """The agent's stats messages (QoS 0, a few per run), kept last first: its final one
    carries the link's counters and the delivery delays."""

    def __init__(self, port: int, topic: str) -> None:
        from agent.mqtt.client import make_client
        from agent.mqtt.endpoint import MqttEndpoint

        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = make_client(MqttEndpoint(port=port), default_client_id="bench-stats")
        self.client.on_message = lambda _c, _u, msg: self.messages.put(json.loads(msg.payload))
        self.client.start()
        if not self.client.wait_connected(30):
            raise ConnectionError(f"no broker on port {port}")
        self.client.subscribe_and_wait(topic, 30)

    def last(self) -> dict[str, Any]:
        """The newest stats message received so far (they are drained)."""
        out: dict[str, Any] = {}
        while True:
            try:
                out = self.messages.get_nowait()
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.stop()


def _agent_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "--config", str(config), "--log-level",
            "WARNING"]


def _profiled_run(config: Path, out: Path) -> None:
    """One agent run under py-spy: every thread sampled 200 times a second, only samples
    of the thread holding the GIL kept (raw collapsed stacks in ``out``)."""
    exe = py_spy()
    assert exe is not None
    subprocess.run([exe, "record", "--gil", "-r", "200", "--format", "raw", "-o", str(out),
                    "--", *_agent_command(config)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _agent_run(config: Path, workdir: Path) -> dict[str, float]:
    """Run knet-agent once: seconds from READY to exit (and to STOPPING, sent once every
    message is acknowledged), CPU seconds, peak RSS MB."""
    sock_path = workdir / f"notify-{time.monotonic_ns()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(120)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(
            _agent_command(config), env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while b"READY=1" not in sock.recv(4096):
            pass
        t_ready = time.perf_counter()
        marks: dict[str, float] = {}

        def _wait_exit() -> None:
            proc.wait()
            marks["exit"] = time.perf_counter()

        def _wait_stopping() -> None:
            try:
                while b"STOPPING=1" not in sock.recv(4096):
                    pass
                marks["stopping"] = time.perf_counter()
            except OSError:
                pass  # the agent died first; the exit code says why

        waiter = threading.Thread(target=_wait_exit, daemon=True)
        threading.Thread(target=_wait_stopping, daemon=True).start()
        waiter.start()
        peak_kb = 0
        while waiter.is_alive():  # the agent's own peak RSS, sampled from /proc
            peak_kb = max(peak_kb, _rss_kb(proc.pid))
            waiter.join(0.05)
        err = proc.stderr.read() if proc.stderr else ""
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"knet-agent failed: {err[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": marks["exit"] - t_ready,
            "to_stopping_s": marks.get("stopping", float("nan")) - t_ready,
            "cpu_s": cpu, "rss_mb": peak_kb / 1024}


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _variants(batch_sizes: list[int] | None) -> dict[str, tuple[int, float, int]]:
    """name -> (every_n, max_samples_per_s, batch_size)."""
    if not batch_sizes:
        return {name: (every, rate, 1) for name, (every, rate) in VARIANTS.items()}
    return {f"every input, batch {b}": (1, 0.0, b) for b in batch_sizes}


def run_agent_bench(model: str = "effnet-lite0", frames: int = 20_000, repeats: int = 3,
                    json_path: Path | None = None, codec: str = "uint8+lz4",
                    distinct: int = 1000, batch_sizes: list[int] | None = None,
                    profile_dir: Path | None = None) -> dict[str, Any]:
    from agent.infer.manifest import PartitionManifest
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner
    from agent.wire.topics import Topics
    from broker.launcher import Mosquitto
    from cloud_trainer.models.export import export_partition
    from cloud_trainer.training.train import model_inputs, trained_pair

    if profile_dir is not None and py_spy() is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    variants = _variants(batch_sizes)
    pair = trained_pair(model)
    x = model_inputs(model, min(distinct, frames))
    profiles: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_partition(pair.student, work / "model", model_id=model, model_version=1)
        manifest = PartitionManifest.load(work / "model" / "manifest.json")
        np.savez(work / "inputs.npz", x=x)
        profile = load_profile("x86-dev")
        plain = plain_chain(manifest, work / "model", profile)
        runner = BlockRunner(manifest, work / "model", profile)
        runner.warmup()
        bound = runner.bound()  # the agent's own way to run the blocks, without the agent
        assert bound is not None and bound.fused
        boundary = [min(2, manifest.num_blocks - 1)]
        results: dict[str, list[dict[str, float]]] = {}
        with Mosquitto(work / "broker") as broker:
            stats = StatsListener(broker.port, Topics("bench").stats("bench-1"))
            try:
                for r in range(repeats):
                    for v, (name, (every, rate, batch)) in enumerate(variants.items()):
                        cfg = work / f"agent-{v}.toml"
                        _write_config(cfg, broker.port, work / "model" / "manifest.json",
                                      work / "inputs.npz", work / f"state-{v}-{r}", every,
                                      boundary, codec, rate, frames, batch)
                        # bare runs on either side of the agent run: drift cancels in the mean
                        before = _bare_fps(plain, x, frames)
                        chain = _bare_fps(bound.run, x, frames)
                        stats.last()
                        run = _agent_run(cfg, work)
                        bare = (before + _bare_fps(plain, x, frames)) / 2
                        run.update(bare_fps=bare, chain_fps=chain,
                                   fps=frames / run["to_stopping_s"],
                                   fps_to_exit=frames / run["seconds"],
                                   **_link_figures(_final_stats(stats), run["to_stopping_s"]))
                        results.setdefault(name, []).append(run)
                if profile_dir is not None:
                    profiles = _profile_variants(variants, work, broker.port, boundary, codec,
                                                 frames, profile_dir)
            finally:
                stats.close()
    rows = _rows(results, variants)
    _print_rows(rows, f"{model} student, batch 1, {frames} frames ({len(x)} distinct, "
                      f"replayed), median of {repeats}; uplink: boundary {boundary[0]}, "
                      f"{codec}", bool(batch_sizes))
    if profiles:
        _print_profiles(profiles, frames)
    result = {"model": model, "frames": frames, "distinct": len(x), "repeats": repeats,
              "rows": rows, "raw": results, "profile_samples": profiles}
    write_json(json_path, "agent", command_line(), result)
    return result


def _rows(results: dict[str, list[dict[str, float]]],
          variants: dict[str, tuple[int, float, int]]) -> list[dict[str, Any]]:
    """Medians per variant, after the two reference rows."""
    rows: list[dict[str, Any]] = []
    every = [run for runs in results.values() for run in runs]
    nan = float("nan")
    rows.append({"pipeline": "bare onnxruntime (InferenceSession.run per block)",
                 "fps": statistics.median(r["bare_fps"] for r in every), "ratio": 1.0,
                 "fps_to_exit": nan, "ratio_to_exit": nan, "cpu_s": nan, "rss_mb": nan})
    rows.append({"pipeline": "bare, the agent's fused session alone (IOBinding)",
                 "fps": statistics.median(r["chain_fps"] for r in every),
                 "ratio": statistics.median(r["chain_fps"] / r["bare_fps"] for r in every),
                 "fps_to_exit": nan, "ratio_to_exit": nan, "cpu_s": nan, "rss_mb": nan})
    for name in variants:
        runs = results[name]
        rows.append({
            "pipeline": f"knet-agent, uplink {name}",
            "fps": statistics.median(r["fps"] for r in runs),
            # the median of per-pair ratios: each agent run against the bare run beside it
            "ratio": statistics.median(r["fps"] / r["bare_fps"] for r in runs),
            "fps_to_exit": statistics.median(r["fps_to_exit"] for r in runs),
            "ratio_to_exit": statistics.median(r["fps_to_exit"] / r["bare_fps"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "rss_mb": max(r["rss_mb"] for r in runs),
            **{k: statistics.median(r[k] for r in runs) for k in _LINK_KEYS}})
    return rows


def _print_rows(rows: list[dict[str, Any]], title: str, batched: bool) -> None:
    nan = float("nan")
    if batched:
        print_table(title, ["pipeline", "frames/s", "× bare", "msgs/s", "kB/s",
                            "delivery p50 ms", "delivery p99 ms", "agent CPU s"],
                    [(r["pipeline"], r["fps"], r["ratio"], r.get("msgs_per_s", nan),
                      r.get("bytes_per_s", nan) / 1e3, r.get("delivery_ms_p50", nan),
                      r.get("delivery_ms_p99", nan), r["cpu_s"]) for r in rows])
    else:
        print_table(title, ["pipeline", "frames/s", "× bare", "frames/s to exit",
                            "× bare to exit", "agent CPU s", "agent peak RSS MB"],
                    [(r["pipeline"], r["fps"], r["ratio"], r["fps_to_exit"],
                      r["ratio_to_exit"], r["cpu_s"], r["rss_mb"]) for r in rows])
    console.print("[dim]agent time runs from READY to STOPPING, which the agent sends once the "
                  "source is finished and the broker acknowledged every message; 'to exit' "
                  "adds the clean shutdown and interpreter teardown. × bare: median of the "
                  "ratios to the mean of the bare runs just before and after each agent run. "
                  "The agent runs its blocks as one fused session (agent/infer/fuse.py); its "
                  "pipeline keeps (× bare) / (fused × bare) of that session's rate. CPU "
                  "includes start-up. Delivery: a sample's inference to the PUBACK of its "
                  "message.[/dim]")


_LINK_KEYS = ("msgs_per_s", "bytes_per_s", "delivery_ms_p50", "delivery_ms_p99")


def _final_stats(listener: StatsListener, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's last stats message (published just before it disconnects)."""
    deadline = time.monotonic() + timeout
    last = listener.last()
    while not last.get("link") and time.monotonic() < deadline:
        try:
            last = listener.messages.get(timeout=0.1)
        except queue.Empty:
            continue
    return last


def _link_figures(stats: dict[str, Any], seconds: float) -> dict[str, float]:
    link, net = stats.get("link") or {}, stats.get("network") or {}
    nan = float("nan")
    acked = link.get("acked")
    return {"msgs_per_s": acked / seconds if acked is not None else nan,
            "bytes_per_s": link.get("bytes_out", nan) / seconds,
            "delivery_ms_p50": net.get("delivery_ms_p50") or nan,
            "delivery_ms_p99": net.get("delivery_ms_p99") or nan}


def _profile_variants(variants: dict[str, tuple[int, float, int]], work: Path, port: int,
                      boundary: list[int], codec: str, frames: int, out_dir: Path
                      ) -> dict[str, dict[str, float]]:
    """One py-spy run per variant; GIL-holding samples per part of the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, float]] = {}
    for v, (name, (every, rate, batch)) in enumerate(variants.items()):
        cfg = work / f"agent-profile-{v}.toml"
        _write_config(cfg, port, work / "model" / "manifest.json", work / "inputs.npz",
                      work / f"state-profile-{v}", every, boundary, codec, rate, frames, batch)
        raw = out_dir / f"py-spy-{v}-batch{batch}-every{every}.txt"
        _profiled_run(cfg, raw)
        out[name] = dict(summarize(raw))
    return out


def _print_profiles(profiles: dict[str, dict[str, float]], frames: int) -> None:
    """GIL-holding time per input, by part: py-spy samples at 200 Hz are 5 ms each."""
    names = list(profiles)
    parts = [p for p, _ in PARTS] + ["other"]
    print_table(f"py-spy, GIL held, µs per input ({frames} inputs; 200 Hz samples)",
                ["part", *names],
                [(p, *[profiles[n].get(p, 0) * 5000 / frames for n in names]) for p in parts]
                + [("total", *[sum(profiles[n].values()) * 5000 / frames for n in names])])
