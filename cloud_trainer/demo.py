"""`knet demo`: what knet does today, end to end on this machine, as a user would run it.

Trains the digits teacher/student pair (cached), exports the student for three firmware
profiles (each gets the opset/IR its onnxruntime reads), starts a private Mosquitto and the
then runs three `knet-agent` processes with their own
config files, each with its own uplink policy and codec. A collector stands in for the
trainer's ingest and checks every activation; the live view and the final table show
accuracy, bytes and losses per device.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.envelope import Envelope, EnvelopeError
from agent.topics import Topics

console = Console(width=None if sys.stdout.isatty() else 120)
FLEET = "demo"


@dataclass
class DeviceSpec:
    device: str
    profile: str
    first: int
    last: int
    uplink: dict[str, Any]


DEVICES = (
    DeviceSpec("pi4-kitchen", "rpi4", 1, 4, {"every_n": 1, "boundaries": [2],
                                             "codec": "uint8+lz4"}),
    DeviceSpec("nano-door", "jetson-nano", 1, 4, {"every_n": 5, "boundaries": [1, 3],
                                                  "codec": "uint8+lz4", "hard_threshold": 0.9}),
    DeviceSpec("x86-lab", "x86-dev", 1, 4, {"every_n": 2, "boundaries": [3],
                                            "codec": "zfp:precision=12"}),
)


@dataclass
class Seen:
    """What the cloud side observed for one device."""

    acts: int = 0
    act_bytes: int = 0
    keys: set[tuple[int, int]] = field(default_factory=set)
    duplicates: int = 0
    bad: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    state: str = "-"


class Observer:
    """Subscribes to the fleet like the trainer will: activations, stats, state."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.topics = topics
        self.devices: dict[str, Seen] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-observer",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(topics.all_devices("#"), 1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 5:
            return
        device, leaf = parts[-2], parts[-1]
        with self.lock:
            seen = self.devices.setdefault(device, Seen())
            if leaf == "act":
                try:
                    env = Envelope.unpack(msg.payload)
                except EnvelopeError:
                    seen.bad += 1
                    return
                key = (env.session, env.seq)
                if key in seen.keys:
                    seen.duplicates += 1
                    return
                seen.keys.add(key)
                seen.acts += 1
                seen.act_bytes += len(msg.payload)
            elif leaf == "stats":
                seen.stats = json.loads(msg.payload)
            elif leaf == "state":
                seen.state = json.loads(msg.payload).get("state", "?")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_agent_config(path: Path, spec: DeviceSpec, port: int, manifest: Path,
                       inputs: Path, state: Path) -> None:
    lines = [
        "[device]", f'id = "{spec.device}"', f'fleet = "{FLEET}"', f'state_dir = "{state}"',
        f'cache_dir = "{state}/cache"', "",
        "[model]", f'manifest = "{manifest}"', f'profile = "{spec.profile}"', "",
        "[mqtt]", 'host = "127.0.0.1"', f"port = {port}", "",
        "[source]", 'kind = "npz"', f'path = "{inputs}"', "rate_hz = 150", "",
        "[uplink]",
        *(f"{k} = {json.dumps(v).lower() if isinstance(v, bool) else json.dumps(v)}"
          for k, v in spec.uplink.items()), "",
        "[pipeline]", "exit_when_done = true", "",
        "[metrics]", "stats_interval_s = 0.5", "",
    ]
    path.write_text("\n".join(lines))


def view(observer: Observer, expected: dict[str, int]) -> Table:
    t = Table(title="knet demo — fleet view", header_style="bold")
    for col in ("device", "state", "frames", "accuracy", "activations", "bytes up", "spool"):
        t.add_column(col, justify="left" if col == "device" else "right")
    with observer.lock:
        for name in expected:
            s = observer.devices.get(name, Seen())
            st = s.stats
            acc = st.get("accuracy_total")
            t.add_row(name, s.state, f"{st.get('frames', 0)}/{expected[name]}",
                      "-" if acc is None else f"{acc * 100:.1f} %", str(s.acts),
                      f"{s.act_bytes / 1024:.1f} KiB",
                      str(st.get("spool_records", "-")))
    return t


def run_demo(args: argparse.Namespace) -> int:
    from agent.manifest import PartitionManifest
    from broker.launcher import Mosquitto
    from cloud_trainer.data import digits_splits
    from cloud_trainer.export import export_partition
    from cloud_trainer.train import evaluate, trained_pair

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    topics = Topics(FLEET)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("training digits teacher and student (cached)", total=None)

        def on_epoch(what: str, epoch: int, epochs: int, loss: float) -> None:
            progress.update(task, description=f"training {what}: epoch {epoch}/{epochs}, "
                            f"loss {loss:.3f}", total=epochs, completed=epoch)

        pair = trained_pair("digits", seed=args.seed, progress=on_epoch)
    split = digits_splits()
    teacher_acc = evaluate(pair.teacher, split.x_test, split.y_test)
    student_acc = evaluate(pair.student, split.x_test, split.y_test)
    console.print(f"digits: teacher {pair.teacher.params():,} params, {teacher_acc:.2%}; "
                  f"student {pair.student.params():,} params "
                  f"({pair.size_reduction:.0%} fewer), {student_acc:.2%}")

    import numpy as np

    inputs = out / "digits-test.npz"
    np.savez(inputs, x=split.x_test, y=split.y_test)
    from agent.profiles import load_profile

    manifests: dict[str, PartitionManifest] = {}
    for spec in DEVICES:
        prof = load_profile(spec.profile)
        manifests[spec.device] = export_partition(
            pair.student, out / "models" / spec.device, model_id="digits", model_version=1,
            first=spec.first, last=spec.last, ort_version=prof.onnxruntime)
        m = manifests[spec.device]
        console.print(f"exported blocks {m.first}..{m.last} for {spec.device} ({spec.profile}, "
                      f"onnxruntime {prof.onnxruntime}): opset {m.opset}, IR {m.ir_version}")

    expected = {spec.device: len(split.x_test) for spec in DEVICES}
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    with Mosquitto(out / "broker") as broker:
        observer = Observer(broker.port, topics)
        try:
            for spec in DEVICES:
                cfg = out / f"{spec.device}.toml"
                write_agent_config(cfg, spec, broker.port,
                                   out / "models" / spec.device / "manifest.json", inputs,
                                   out / "state" / spec.device)
                log = open(out / f"{spec.device}.log", "wb")  # noqa: SIM115
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT))
            with Live(view(observer, expected), console=console, refresh_per_second=4) as live:
                while any(p.poll() is None for p in procs):
                    live.update(view(observer, expected))
                    time.sleep(0.25)
                time.sleep(0.5)  # the last stats message
                live.update(view(observer, expected))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the agents and the broker[/yellow]")
            return 130
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            observer.close()
    elapsed = time.monotonic() - started
    from bench.codec import run_codec_bench

    console.rule("what the codecs cost on these activations (knet bench codec)")
    run_codec_bench(model="digits", seed=args.seed, samples=270,
                    codecs=["raw", "fp16+lz4", "uint8+lz4", "int8+lz4", "zfp:precision=12"],
                    json_path=out / "codecs.json", plot_path=out / "codecs.png")
    return summarise(out, observer, manifests, expected, teacher_acc, student_acc, elapsed,
                     [p.returncode for p in procs])


def summarise(out: Path, observer: Observer, manifests: dict[str, Any],
              expected: dict[str, int], teacher_acc: float, student_acc: float,
              elapsed: float, codes: list[int | None]) -> int:
    rows = []
    for spec in DEVICES:
        s = observer.devices.get(spec.device, Seen())
        st = s.stats
        sent = st.get("link", {}).get("acked", 0)
        m = manifests[spec.device]
        rows.append({
            "device": spec.device, "profile": spec.profile, "blocks": f"{m.first}..{m.last}",
            "opset/IR": f"{m.opset}/{m.ir_version}", "frames": st.get("frames", 0),
            "accuracy": st.get("accuracy_total"), "activations": s.acts,
            "bytes_up": s.act_bytes, "acked_by_broker": sent,
            "lost": max(0, sent - s.acts), "duplicates": s.duplicates,
        })
    t = Table(title=f"knet demo summary ({elapsed:.0f} s)", header_style="bold")
    for col in ("device", "profile", "blocks", "opset/IR", "frames", "accuracy",
                "activations", "bytes up", "lost"):
        t.add_column(col, justify="left" if col in ("device", "profile") else "right")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy'] * 100:.1f} %"
        t.add_row(r["device"], r["profile"], r["blocks"], r["opset/IR"],
                  f"{r['frames']}/{expected[r['device']]}", acc, str(r["activations"]),
                  f"{r['bytes_up'] / 1024:.1f} KiB", str(r["lost"]))
    console.print(t)
    console.print(f"teacher {teacher_acc:.2%}, student {student_acc:.2%} (torch) on the same "
                  "test split; the agents' accuracy is onnxruntime's, on every input they ran.")
    summary = {"elapsed_s": elapsed, "teacher_accuracy": teacher_acc,
               "student_accuracy": student_acc, "devices": rows,
               "agent_exit_codes": codes}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    console.print(f"[dim]wrote {out / 'summary.json'}; agent logs and configs in {out}[/dim]")
    ok = all(c == 0 for c in codes) and all(r["lost"] == 0 for r in rows) and all(
        r["frames"] == expected[r["device"]] for r in rows)
    return 0 if ok else 1
