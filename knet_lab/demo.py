"""`knet demo`: a fleet whose cameras drift, retrained by the cloud teacher, recovering live.

What runs (``knet_lab.fleet``): a private, ACL-protected Mosquitto with per-device
credentials (``knet broker run``), ``knet-trainer --config trainer.toml`` with a short
retraining schedule, and ``--devices`` ``knet-agent`` processes on different firmware
profiles, each with its own credentials and config file — all on loopback, all as the
README documents them. Each device's camera streams the digits test split onto its input
topic: one clean pass (the warm-up), then the same frames under a camera drift
(``knet_lab.drift``). The students' accuracy drops; the agents keep uplinking raw
inputs (boundary 0, ``allow_raw_upload``) under their policies; the scheduled job retrains
the student label-free, block by block against the teacher, passes the gate, signs and
pushes the changed blocks; the agents verify, self-test and swap them live.

A device counts as recovered once a whole pass of drifted frames, all sent after it applied
an update, scores within ``--tolerance`` points of the teacher's accuracy on the same
drifted frames. The demo ends when every device recovered, when ``--rounds`` updates were
pushed and evaluated, or after ``--duration`` seconds. Losses are counted end to end: every
activation seen on the broker must be in the trainer's sample store, every frame sent must
have been inferred, and no spool may hold anything at the end.

Writes ``summary.json``, ``accuracy.png`` (accuracy over time per device, drift and update
markers), the configs and every process's log to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console as RichConsole
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker.launcher import free_port
from cloud_trainer.models.modelref import zoo_name
from knet_lab.fleet import Lab, LabSettings, device_specs

console = RichConsole(width=None if sys.stdout.isatty() else 140)
LAB_DIRS = ("broker", "trainer", "agents", "models", "keys", "logs")


# -- the scenario ---------------------------------------------------------------------------
@dataclass
class DeviceProgress:
    phase: str = "warm-up"  # warm-up -> drift -> evaluating -> recovered
    base_version: int | None = None
    drift_version: int | None = None  # what it ran when the drift began
    eval_version: int | None = None
    eval_from: int | None = None  # index of the first frame of the evaluation pass
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    recovered_at: float | None = None


@dataclass(frozen=True)
class Feed:
    """What one camera streams: clean frames, their labels, the same frames drifted, and
    the teacher's accuracy on the drifted ones (the bar a device recovers to)."""

    x: np.ndarray
    y: np.ndarray
    x_drift: np.ndarray
    teacher_drift: float
    scene: str = ""


@dataclass
class Scenario:
    """Feeds the cameras and decides when the fleet has recovered (module doc)."""

    lab: Lab
    feeds: dict[str, Feed]
    rate_hz: float = 50.0
    rounds: int = 3
    duration_s: float = 240.0
    tolerance: float = 0.02
    devices: dict[str, DeviceProgress] = field(default_factory=dict)
    t_start: float = 0.0
    t_drift: float | None = None
    t_end: float | None = None
    reason: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)  # set: cameras hold

    def run(self) -> None:
        self.t_start = time.time()
        names = list(self.lab.cameras)
        self.devices = {d: DeviceProgress() for d in names}
        try:
            self._feed("clean", passes=1)
            self._wait_results(timeout=15.0)
            if self.stop.is_set():
                return
            self.t_drift = time.time()
            for d in names:
                self.devices[d].phase = "drift"
                self.devices[d].base_version = self._version(d)
                self.devices[d].drift_version = self.devices[d].base_version
            while not self.stop.is_set() and not self._finished():
                self._feed("drift", passes=None, check_every=self.frames // 4)
        finally:
            self.t_end = time.time()

    @property
    def frames(self) -> int:
        """Frames in one pass (every camera's feed has as many)."""
        return len(next(iter(self.feeds.values())).x)

    def _version(self, device: str) -> int | None:
        con = self.lab.console
        assert con is not None
        with con.lock:
            return con.view(device).version

    def _feed(self, phase: str, passes: int | None, check_every: int = 0) -> None:
        """Send each camera its feed (clean or drifted) at ``rate_hz``; ``passes=None``: until
        a check (every ``check_every`` frames) says stop."""
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        n = self.frames
        i = 0
        next_t = time.monotonic()
        while not self.stop.is_set():
            if passes is not None and i >= passes * n:
                return
            while self.paused.is_set() and not self.stop.is_set():
                time.sleep(0.05)
                next_t = time.monotonic()
            j = i % n
            for d, cam in self.lab.cameras.items():
                f = self.feeds[d]
                x = f.x if phase == "clean" else f.x_drift
                cam.send(x[j], int(f.y[j]), phase, self._version(d))
            i += 1
            if check_every and i % check_every == 0:
                self._advance()
                if self._finished():
                    return
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_t = time.monotonic()  # fell behind: do not burst

    def _wait_results(self, timeout: float) -> None:
        con = self.lab.console
        assert con is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            with con.lock:
                done = all(len(con.view(d).results) >= len(cam.sent)
                           for d, cam in self.lab.cameras.items())
            if done:
                return
            time.sleep(0.1)

    def _advance(self) -> None:
        """Start and score evaluation passes as devices apply updates."""
        con = self.lab.console
        assert con is not None
        for d, p in self.devices.items():
            cam = self.lab.cameras[d]
            v = self._version(d)
            if p.phase == "drift" and v is not None and p.base_version is not None \
                    and v > p.base_version and v != p.eval_version:
                p.phase, p.eval_version = "evaluating", v
                with cam.lock:
                    p.eval_from = len(cam.sent)
            elif p.phase == "evaluating" and p.eval_from is not None:
                with cam.lock:
                    sent = cam.sent[p.eval_from:]
                if len(sent) < self.frames:
                    continue
                acc = self._accuracy(d, p.eval_from, p.eval_from + self.frames)
                if acc is None:
                    continue  # results still on their way
                ok = acc >= self.feeds[d].teacher_drift - self.tolerance
                p.evaluations.append({"version": p.eval_version, "accuracy": acc,
                                      "recovered": ok, "time": time.time()})
                if ok:
                    p.phase = "recovered"
                    p.recovered_at = self._applied_time(d, p.eval_version)
                else:
                    p.phase, p.base_version = "drift", p.eval_version

    def _applied_time(self, device: str, version: int | None) -> float | None:
        con = self.lab.console
        assert con is not None
        for r in con.applied(device):
            if r.get("version") == version:
                return float(r["received"])
        return None

    def _accuracy(self, device: str, lo: int, hi: int) -> float | None:
        """Accuracy over frames ``lo..hi-1`` from the device's results; None until all came."""
        con = self.lab.console
        assert con is not None
        with con.lock:
            res = [r for r in con.view(device).results if lo <= r[0] < hi]
        if len({r[0] for r in res}) < hi - lo:
            return None
        return sum(r[1] == r[2] for r in res) / len(res)

    def pushed(self) -> int:
        con = self.lab.console
        assert con is not None
        with con.lock:
            return int(con.trainer.get("rounds", 0) or 0)

    def _finished(self) -> bool:
        if all(p.phase == "recovered" for p in self.devices.values()):
            self.reason = "every device recovered"
            return True
        if time.time() - self.t_start > self.duration_s:
            self.reason = f"--duration {self.duration_s:.0f} s reached"
            return True
        if self.pushed() >= self.rounds and all(p.phase != "evaluating"
                                                for p in self.devices.values()):
            self.reason = f"--rounds {self.rounds} updates pushed and evaluated"
            return True
        return False


# -- the live view --------------------------------------------------------------------------
def _kib(n: int | float) -> str:
    return f"{n / 1024:.1f} KiB"


def live_view(lab: Lab, sc: Scenario | None, profiles: dict[str, str]) -> Group:
    con = lab.console
    assert con is not None
    t = Table(title="knet demo — fleet", header_style="bold")
    for col in ("device", "profile", "state", "version", "phase", "frames", "accuracy",
                "samples up", "bytes up", "bytes down", "spool"):
        t.add_column(col, justify="left" if col in ("device", "profile", "phase") else "right")
    with con.lock:
        for d, cam in lab.cameras.items():
            v = con.view(d)
            st = v.stats
            acc = st.get("accuracy")
            down = sum(int(r.get("bytes", 0)) for r in v.reports if r.get("status") == "applied")
            phase = sc.devices[d].phase if sc and d in sc.devices else "starting"
            t.add_row(d, profiles[d], v.state, f"v{v.version}" if v.version else "-", phase,
                      f"{st.get('frames', 0)}/{len(cam.sent)}",
                      "-" if acc is None else f"{acc * 100:.1f} %", str(len(v.act_keys)),
                      _kib(v.act_bytes), _kib(down), str(st.get("spool_records", "-")))
        tr = dict(con.trainer)
    runs = tr.get("runs") or {}
    last = next(iter(runs.values()), {}) if runs else {}
    elapsed = time.time() - (sc.t_start if sc and sc.t_start else time.time())
    drift = "" if not sc or sc.t_drift is None else \
        f", drift since {time.time() - sc.t_drift:.0f} s"
    version = f"v{last['version']}" if last.get("version") else ""
    line = Text(f"trainer {tr.get('state', '-')}: {tr.get('rounds', 0)} update(s) pushed; "
                f"last run {last.get('status', '-')} {version} "
                f"{(last.get('reason') or '')[:80]} | {elapsed:.0f} s{drift}")
    return Group(t, line)


# -- results --------------------------------------------------------------------------------
def _phase_accuracy(lab: Lab, device: str, pred: Any) -> float | None:
    con, cam = lab.console, lab.cameras[device]
    assert con is not None
    hits = n = 0
    with cam.lock:
        sent = list(cam.sent)
    with con.lock:
        results = list(con.view(device).results)
    for index, prediction, label, _t in results:
        if index < len(sent) and pred(index, sent[index]):
            n += 1
            hits += prediction == label
    return hits / n if n else None


def _label_mismatches(lab: Lab, device: str) -> int:
    con, cam = lab.console, lab.cameras[device]
    assert con is not None
    with con.lock:
        results = list(con.view(device).results)
    return sum(1 for idx, _p, label, _t in results
               if idx >= len(cam.sent) or cam.sent[idx][1] != label)


def wait_drained(lab: Lab, timeout: float = 60.0) -> bool:
    """Every frame sent was inferred and every agent's spool is empty."""
    con = lab.console
    assert con is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with con.lock:
            ok = all(con.view(d).stats.get("frames", -1) >= len(cam.sent)
                     and con.view(d).stats.get("spool_records", 1) == 0
                     and con.view(d).stats.get("link", {}).get("spooled", 0)
                     <= con.view(d).stats.get("link", {}).get("acked", 0)
                     for d, cam in lab.cameras.items())
        if ok:
            return True
        time.sleep(0.25)
    return False


def store_keys(lab: Lab) -> set[tuple[str, int, int]]:
    """The trainer store's sample keys, read-only (the trainer may still be writing)."""
    path = lab.trainer_dir / "store"
    db = next(iter(sorted(path.glob("*.sqlite*"))), None) if path.is_dir() else None
    if db is None:
        return set()
    from cloud_trainer.ingest.store import _from_i64

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT device, session, seq FROM samples").fetchall()
    finally:
        con.close()
    return {(d, _from_i64(s), _from_i64(q)) for d, s, q in rows}


def wait_stored(lab: Lab, timeout: float = 60.0) -> tuple[set[Any], set[Any]]:
    """Until every activation seen on the broker is in the store; returns (seen, stored)."""
    con = lab.console
    assert con is not None
    deadline = time.monotonic() + timeout
    while True:
        with con.lock:
            seen = {(d, s, q) for d in lab.cameras for s, q in con.view(d).act_keys}
        stored = store_keys(lab)
        if seen <= stored or time.monotonic() >= deadline:
            return seen, stored
        time.sleep(0.5)


def summarise(lab: Lab, sc: Scenario, out: Path, profiles: dict[str, str],
              teacher: dict[str, float], student: dict[str, float], seen: set[Any],
              stored: set[Any], drained: bool, elapsed: float,
              drift_desc: str) -> dict[str, Any]:
    con = lab.console
    assert con is not None
    rows = []
    for d, cam in lab.cameras.items():
        p = sc.devices.get(d, DeviceProgress())
        v = con.view(d)
        final_eval = p.evaluations[-1] if p.evaluations else None
        before = _phase_accuracy(lab, d, lambda _i, s: s[0] == "clean")
        after_drift = _phase_accuracy(
            lab, d, lambda _i, s, v=p.drift_version: s[0] == "drift" and s[2] == v)
        dev_seen = {k for k in seen if k[0] == d}
        dev_stored = {k for k in stored if k[0] == d}
        with con.lock:
            down = sum(int(r.get("bytes", 0)) for r in v.reports if r.get("status") == "applied")
            frames = int(v.stats.get("frames", 0))
            spool = v.stats.get("spool_records")
            reports = [{k: r.get(k) for k in ("version", "status", "reason", "bytes", "seconds")}
                       for r in v.reports]
        feed = sc.feeds[d]
        rows.append({
            "device": d, "profile": profiles[d], "scene": feed.scene or None,
            "teacher_drifted": feed.teacher_drift, "final_version": v.version,
            "accuracy_before_drift": before, "accuracy_after_drift": after_drift,
            "accuracy_after_recovery": final_eval["accuracy"] if final_eval else None,
            "recovered": bool(final_eval and final_eval["recovered"]),
            "evaluations": p.evaluations,
            "recovery_s": (p.recovered_at - sc.t_drift) if p.recovered_at and sc.t_drift
            else None,
            "frames_sent": len(cam.sent), "frames_inferred": frames,
            "samples_up": len(dev_seen), "samples_stored": len(dev_seen & dev_stored),
            "bytes_up": v.act_bytes, "bytes_down": down, "update_reports": reports,
            "spool_left": spool, "wire_duplicates": v.act_duplicates,
            "label_mismatches": _label_mismatches(lab, d),
            "lost": len(dev_seen - dev_stored) + max(0, len(cam.sent) - frames)
            + (spool or 0),
        })
    with con.lock:
        trainer = dict(con.trainer)
        pushed_bytes = con.blob_bytes
    summary = {
        "model": lab.s.model, "drift": drift_desc, "elapsed_s": round(elapsed, 1),
        "drift_to_end_s": round((sc.t_end or time.time()) - sc.t_drift, 1) if sc.t_drift else None,
        "end_reason": sc.reason, "teacher_accuracy": teacher,
        "deployed_student_accuracy": student, "tolerance_points": sc.tolerance * 100,
        "rounds_pushed": trainer.get("rounds", 0), "trainer_runs": trainer.get("runs"),
        "update_bytes_published": pushed_bytes, "drained": drained, "devices": rows,
        "samples_lost": sum(r["lost"] for r in rows),
        "all_recovered": all(r["recovered"] for r in rows),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def print_summary(summary: dict[str, Any]) -> None:
    t = Table(title=f"knet demo summary — {summary['model']}, drift {summary['drift']}, "
                    f"{summary['elapsed_s']:.0f} s", header_style="bold")
    for col in ("device", "profile", "version", "before drift", "after drift",
                "after recovery", "teacher (drifted)", "bytes up", "bytes of updates",
                "drift → recovery", "samples lost"):
        t.add_column(col, justify="left" if col in ("device", "profile") else "right")
    td = summary["teacher_accuracy"]["drifted"]
    scenes = any(r.get("scene") for r in summary["devices"])
    for r in summary["devices"]:
        rec = r["recovery_s"]
        name = r["device"] + (f" ({r['scene']})" if scenes else "")
        t.add_row(name, r["profile"], f"v{r['final_version']}",
                  _pct(r["accuracy_before_drift"]), _pct(r["accuracy_after_drift"]),
                  _pct(r["accuracy_after_recovery"]) + (" ✓" if r["recovered"] else " ✗"),
                  _pct(r.get("teacher_drifted", td)), _kib(r["bytes_up"]), _kib(r["bytes_down"]),
                  "-" if rec is None else f"{rec:.0f} s", str(r["lost"]))
    console.print(t)
    console.print(
        f"teacher (torch): {_pct(summary['teacher_accuracy']['clean'])} clean, {_pct(td)} "
        f"drifted; deployed student (torch): "
        f"{_pct(summary['deployed_student_accuracy']['clean'])} clean, "
        f"{_pct(summary['deployed_student_accuracy']['drifted'])} drifted. "
        f"{summary['rounds_pushed']} update(s) pushed "
        f"({_kib(summary['update_bytes_published'])} of block chunks published); "
        f"ended: {summary['end_reason']}; samples lost: {summary['samples_lost']}.")
    ho = summary.get("held_out") or {}
    if ho:
        parts = [f"teacher {_pct(ho['teacher']['drifted'])}"] + [
            f"{k} {_pct(v['drifted'])} (clean {_pct(v['clean'])})"
            for k, v in ho.items() if k != "teacher"]
        console.print("held out (the training split under the same drift, never streamed; "
                      "torch): " + ", ".join(parts))


def plot(lab: Lab, sc: Scenario, path: Path, window: int = 60) -> None:
    """Accuracy over time per device (rolling over ``window`` frames), drift and updates;
    dashed: the teacher on the device's drifted frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    con = lab.console
    assert con is not None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    t0 = sc.t_start
    for i, d in enumerate(lab.cameras):
        with con.lock:
            res = sorted(con.view(d).results)
            applied = list({r["version"]: r for r in reversed(con.view(d).reports)
                            if r.get("status") == "applied"}.values())  # first per version
        if not res:
            continue
        hits = np.array([p == lbl for _i, p, lbl, _t in res], dtype=np.float64)
        ts = np.array([t for *_x, t in res]) - t0
        k = min(window, len(hits))
        roll = np.convolve(hits, np.ones(k) / k, mode="valid")
        line, = ax.plot(ts[k - 1:], roll * 100, label=d, lw=1.4)
        ax.axhline(sc.feeds[d].teacher_drift * 100, color=line.get_color(), ls="--", lw=0.8)
        for r in applied:
            ax.axvline(float(r["received"]) - t0, color=line.get_color(), ls=":", lw=1.2)
            ax.annotate(f"v{r['version']}", (float(r["received"]) - t0, 5 + 6 * i),
                        color=line.get_color(), fontsize=8)
    if sc.t_drift:
        ax.axvline(sc.t_drift - t0, color="black", lw=1.5)
        ax.annotate("drift", (sc.t_drift - t0, 95), fontsize=9)
    ax.set_xlabel("seconds since the cameras started")
    ax.set_ylabel(f"accuracy, last {window} frames (%)")
    ax.set_ylim(0, 102)
    ax.set_title("knet demo: devices drift and recover (dotted: update applied)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HELD_OUT_MAX = 960  # frames: effnet-lite0's 4,800 took minutes on a loaded 2-core machine


def held_out(lab: Lab, spec: object, versions: set[int]) -> dict[str, dict[str, float]]:
    """Torch accuracy of the versions the devices ended on, on frames no camera streamed:
    the training split under the same drift with another seed (the devices' own numbers are
    on the drifted test frames, which the trainer also trained on, label-free)."""
    import copy

    from cloud_trainer.models.zoo import zoo_entry
    from cloud_trainer.release.registry import Registry
    from cloud_trainer.training.train import evaluate, train_data
    from knet_lab.drift import DriftSpec, apply_drift

    assert isinstance(spec, DriftSpec)
    x, y = (a[:HELD_OUT_MAX] for a in train_data(lab.s.model, lab.s.seed))
    xd = apply_drift(np.asarray(x), DriftSpec(spec.kind, spec.severity, spec.seed + 1),
                     normalised=not zoo_entry(lab.s.model).pixel_input)
    reg = Registry(lab.trainer_dir / "registry")
    out: dict[str, dict[str, float]] = {
        "teacher": {"drifted": evaluate(lab.pair.teacher, xd, y)}}
    for v in sorted(versions):
        model = copy.deepcopy(lab.student)
        reg.load_into(model, reg.get(lab.s.model, v))
        out[f"v{v}"] = {"drifted": evaluate(model, xd, y), "clean": evaluate(model, x, y)}
    return out


# -- the command ----------------------------------------------------------------------------
def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


# Per model: how the demo's trainer retrains (knet_lab.fleet.LabSettings). A round
# on effnet-lite0 costs ~1.5 s per batch of 64 on the 2-core VM (teacher targets + student
# step), so it trains on fewer, newer samples than digits does. Each camera sees its own
# scene: samples are shared fairly between devices and every device is gated on its own
# held-out frames, or the busiest camera's scene wins and the others get worse (first run).
LAB_TUNING: dict[str, dict[str, Any]] = {
    "effnet-lite0": {"max_samples": 600, "epochs": 10, "min_new_samples": 240,
                     "batch_norm": "frozen", "balance": "per_device",
                     "per_device_gate": True},
}
DEFAULT_RATE = {"effnet-lite0": 15.0}  # frames/s per camera; others: 40
# Raw 96x96 RGB frames are ~30 KB on the wire against ~100 B for digits: the devices uplink
# every UPLINK_EVERY-th of what they would, at most UPLINK_MAX_PER_S samples/s each, or the
# trainer's ingest falls behind its retraining on two cores (a first run uplinked 40,000
# frames in 1,000 s, 1 GB; a second lost 3,950 of x86-lab's, whose hard-example rule
# (confidence < 0.9) holds for most frames of a 1,000-class model).
UPLINK_EVERY = {"effnet-lite0": 3}
UPLINK_MAX_PER_S = {"effnet-lite0": 5.0}

DEMO_SCENES = ("chelsea", "coffee", "rocket", "astronaut", "motorcycle", "china", "hubble",
               "clock", "brick", "moon")  # effnet-lite0: camera i sees scene i (cycled)
# effnet-lite0 frames per camera pass: a prime, so that a device uplinking every n-th frame
# covers all of them over n passes (with 96, every 3rd frame was always the same 32).
SCENE_FRAMES = 97


def demo_uplink(model: str, uplink: dict[str, Any]) -> dict[str, Any]:
    """A device's uplink policy in the demo: its lab policy, thinned for heavy models."""
    out = {**uplink, "every_n": uplink["every_n"] * UPLINK_EVERY.get(model, 1)}
    if model in UPLINK_MAX_PER_S:
        out["max_samples_per_s"] = UPLINK_MAX_PER_S[model]
    return out


def build_feeds(model: str, devices: Sequence[str], spec: object, teacher: Any,
                seed: int = 0) -> dict[str, Feed]:
    """Each camera's frames, labels and drifted frames.

    ``digits``/``vision``: every camera streams the held-out test split. ``effnet-lite0``:
    camera ``i`` looks at its own scene (``DEMO_SCENES``), fresh frames never trained on,
    labelled with the teacher's top-1 on the undrifted frame — the truth a user cares about.
    """
    from cloud_trainer.models.scenes import scene_frames
    from cloud_trainer.models.zoo import zoo_entry
    from cloud_trainer.training.train import eval_set, evaluate, teacher_top1
    from knet_lab.drift import DriftSpec, apply_drift

    assert isinstance(spec, DriftSpec)
    norm = not zoo_entry(model).pixel_input
    if not zoo_entry(model).pretrained:
        x, y = (np.asarray(a) for a in eval_set(model, seed))
        xd = apply_drift(x, spec, normalised=norm)
        shared = Feed(x, y, xd, evaluate(teacher, xd, y))
        return dict.fromkeys(devices, shared)
    from cloud_trainer.models.zoo.effnet import IMAGE_SIZE

    feeds = {}
    for i, d in enumerate(devices):
        scene = DEMO_SCENES[i % len(DEMO_SCENES)]
        x = scene_frames(scene, SCENE_FRAMES, IMAGE_SIZE, seed=9000 + seed)
        y = teacher_top1(teacher, x)
        xd = apply_drift(x, spec, normalised=False)
        feeds[d] = Feed(x, y, xd, evaluate(teacher, xd, y), scene)
    return feeds


def _feed_accuracy(model: Any, feeds: dict[str, Feed]) -> dict[str, float]:
    """Accuracy over every camera's frames, clean and drifted (each feed counted once)."""
    from cloud_trainer.training.train import evaluate

    unique = list({id(f): f for f in feeds.values()}.values())
    n = sum(len(f.x) for f in unique)
    return {k: sum(evaluate(model, getattr(f, attr), f.y) * len(f.x) for f in unique) / n
            for k, attr in (("clean", "x"), ("drifted", "x_drift"))}


def _run_live(lab: Lab, sc: Scenario, profiles: dict[str, str]
              ) -> tuple[bool, set[Any], set[Any]]:
    """Run the scenario's cameras under the live view, then wait for the agents to drain
    and the store to hold what the broker saw: (drained, seen, stored)."""
    feeder = threading.Thread(target=sc.run, name="cameras", daemon=True)
    feeder.start()
    with Live(live_view(lab, sc, profiles), console=console, refresh_per_second=4) as live:
        while feeder.is_alive():
            live.update(live_view(lab, sc, profiles))
            feeder.join(0.25)
        t_end = time.time()
        drained = wait_drained(lab)
        t_drained = time.time()
        seen, stored = wait_stored(lab, timeout=180.0)
        console.log(f"drained in {t_drained - t_end:.1f} s, stored in "
                    f"{time.time() - t_drained:.1f} s")
        live.update(live_view(lab, sc, profiles))
    return drained, seen, stored


def _keep_running(lab: Lab, sc: Scenario, profiles: dict[str, str]) -> None:
    """``--keep-running``: the live view until Ctrl-C (KeyboardInterrupt) ends the demo."""
    console.print("--keep-running: the fleet stays up; Ctrl-C stops every process")
    with Live(live_view(lab, sc, profiles), console=console, refresh_per_second=2) as live:
        while True:
            live.update(live_view(lab, sc, profiles))
            time.sleep(0.5)


def _drift_too_strong(feeds: dict[str, Feed], floor_pct: float, drift_desc: str) -> bool:
    """True (and said) when the teacher itself scores below ``floor_pct`` on drifted frames."""
    weak = {d: f.teacher_drift for d, f in feeds.items() if f.teacher_drift < floor_pct / 100}
    if weak:
        console.print(
            f"[red]the drift {drift_desc} is too strong for the teacher itself: on the "
            f"drifted frames it scores {', '.join(f'{d} {_pct(v)}' for d, v in weak.items())}"
            f", below --teacher-floor {floor_pct:g} %. Label-free retraining "
            "cannot recover what the teacher gets wrong; choose a milder --severity or "
            "another --drift.[/red]")
    return bool(weak)


def _report(lab: Lab, sc: Scenario, spec: Any, summary: dict[str, Any], out: Path) -> None:
    """The plot, the held-out evaluation, summary.json and the printed summary."""
    plot(lab, sc, out / "accuracy.png")
    summary["held_out"] = held_out(lab, spec, {int(r["final_version"]) for r in
                                               summary["devices"] if r["final_version"]})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary)
    console.print(f"[dim]wrote {out / 'summary.json'} and {out / 'accuracy.png'}; "
                  f"configs in {out}, logs in {out / 'logs'}[/dim]")


def run_demo(args: argparse.Namespace) -> int:
    from cloud_trainer.models.zoo import get_pair, zoo_entry
    from cloud_trainer.training.train import trained_pair
    from knet_lab.drift import default_spec

    out: Path = args.out.resolve()
    for name in LAB_DIRS:  # a fresh fleet every run; other files in --out stay
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    spec = default_spec(args.model, args.drift, args.severity, seed=args.seed)
    drift_desc = f"{spec.kind} {spec.severity:g}"
    devices = [dataclasses.replace(d, uplink=demo_uplink(args.model, d.uplink))
               for d in device_specs(args.devices)]
    profiles = {d.device: d.profile for d in devices}
    lab = Lab(LabSettings(root=out, model=args.model, devices=devices, seed=args.seed,
                          interval_s=args.interval,
                          console_port=None if args.no_console else
                          (args.console_port or free_port()),
                          **LAB_TUNING.get(args.model, {})))
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.time()
    sc: Scenario | None = None
    try:
        with console.status(f"{args.model}: the teacher and the camera frames"):
            # a pretrained teacher needs no training: check the drift before the student's
            t_model = get_pair(args.model, args.seed).teacher if zoo_entry(args.model).pretrained \
                else trained_pair(args.model, seed=args.seed).teacher
            feeds = build_feeds(args.model, list(profiles), spec, t_model, args.seed)
        teacher = _feed_accuracy(t_model, feeds)
        if _drift_too_strong(feeds, args.teacher_floor, drift_desc):
            return 2
        with console.status("preparing: zoo pair (cached), deployed student, exports, "
                            "credentials") as status:
            lab.prepare(lambda m: status.update(m))
        student = _feed_accuracy(lab.student, feeds)
        console.print(f"{args.model}: teacher {_pct(teacher['clean'])} clean / "
                      f"{_pct(teacher['drifted'])} under {drift_desc}; deployed student "
                      f"{_pct(student['clean'])} / {_pct(student['drifted'])} (torch)")
        with console.status("starting the broker, the trainer and the agents"):
            lab.start()
            if not lab.wait_online(timeout=120):
                console.print("[red]the fleet did not come online; logs in "
                              f"{out / 'logs'}[/red]")
                return 1
        console.print(f"fleet online: broker 127.0.0.1:{lab.port}, trainer, "
                      f"{len(devices)} agents; configs in {out}")
        _announce_console(lab)
        rate = args.rate if args.rate is not None else DEFAULT_RATE.get(args.model, 40.0)
        sc = Scenario(lab, feeds, rate_hz=rate, rounds=args.rounds,
                      duration_s=args.duration, tolerance=args.tolerance / 100)
        drained, seen, stored = _run_live(lab, sc, profiles)
        summary = summarise(lab, sc, out, profiles, teacher, student, seen, stored, drained,
                            time.time() - started, drift_desc)
        _report(lab, sc, spec, summary, out)
        if args.keep_running:
            _keep_running(lab, sc, profiles)
        ok = summary["all_recovered"] and summary["samples_lost"] == 0
        return 0 if ok else 1
    except KeyboardInterrupt:
        if sc is not None:
            sc.stop.set()
        console.print("[yellow]interrupted: stopping every process the demo started[/yellow]")
        return 130
    finally:
        if sc is not None:
            sc.stop.set()
        codes = lab.close()
        bad = {k: v for k, v in codes.items() if v not in (0, None)}
        if bad:
            console.print(f"[yellow]exit codes: {bad}[/yellow]")


def _announce_console(lab: Lab) -> None:
    if lab.console_url:
        console.print(f"console: {lab.console_url} (operator token for its actions in "
                      f"{lab.console_token_file}; `knet fleet list --url {lab.console_url} "
                      f"--token-file {lab.console_token_file}`)")


def add_arguments(d: argparse.ArgumentParser) -> None:
    """The `knet demo` options (knet_cli/main.py registers the subcommand)."""
    from cloud_trainer.models.zoo import zoo_names
    from knet_lab.drift import DRIFTS

    d.add_argument("--model", type=zoo_name, default="digits",
                   help=f"a zoo model ({', '.join(zoo_names())}): the cameras stream its data")
    d.add_argument("--devices", type=int, default=3, help="agents to run (default 3)")
    d.add_argument("--drift", choices=DRIFTS, default=None,
                   help="camera drift (default: contrast loss, severity 0.5 for digits)")
    d.add_argument("--severity", type=float, default=None, help="drift severity in (0, 1]")
    d.add_argument("--rounds", type=int, default=3, help="most updates to push and evaluate")
    d.add_argument("--duration", type=float, default=240.0,
                   help="seconds the cameras stream at most")
    d.add_argument("--interval", type=float, default=20.0,
                   help="the retraining job's schedule, seconds")
    d.add_argument("--rate", type=float, default=None,
                   help="frames per second per camera (default 40; effnet-lite0: 15)")
    d.add_argument("--teacher-floor", type=float, default=50.0,
                   help="refuse a drift under which the teacher scores below this (%%)")
    d.add_argument("--tolerance", type=float, default=2.0,
                   help="points below the teacher that count as recovered")
    d.add_argument("--out", type=Path, default=Path("out/demo"))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--console-port", type=int, default=None,
                   help="port of the trainer's web console (default: a free one)")
    d.add_argument("--no-console", action="store_true", help="run without the web console")
    d.add_argument("--keep-running", action="store_true",
                   help="after the summary, keep the fleet running until Ctrl-C")
