"""One retraining run: select → train → gate → export → sign → publish (staged) → record.

Every run has a run id, written to the run log (``cloud_trainer/release/runs.py``) before any work,
and every step is idempotent and keyed on it, so a trainer killed at any point is resumed by
the next run of the job and the registry stays consistent:

* **select** reads the samples of the deployed version in the run's fixed window
  ``[since, until)`` (both persisted), so a resumed run sees the same data.
* **train** registers the candidate with ``info.run_id``; a resumed run finds it instead of
  training twice. A version is ``candidate`` until the gate decides.
* **gate** moves it to ``rejected`` (recorded with scores, never published) or ``approved``.
* **export** is content-addressed (a block's ONNX file is cached by its weights' sha256 and
  the export target), so only changed blocks are exported and a repeat costs nothing.
* **publish**: each stage's signed manifest is written to ``manifests/`` *before* it is
  published and re-used on resume; a manifest is only ever built from complete, verified
  exports (``make_update`` checks every file), never half-built.
* a run interrupted ``MAX_ATTEMPTS`` times, or failing with an error, ends ``failed`` (its
  version too), so a poisonous run cannot crash-loop the trainer.

Supervision is label-free (KnowledgeNet block-wise KT, ``cloud_trainer/training/distill.py``) unless
``training.mode`` asks for training from operator labels (``Sample.label``; backprop,
pipelined or synthetic gradients across worker processes, ``cloud_trainer/training/disagg``):

* with raw inputs (boundary 0): ``train_student_blockwise_from_inputs`` on them, every block;
* with only boundaries ≥ 1: let ``b`` be the lowest uplinked boundary. Blocks ``1..b`` stay
  frozen (reported: without boundary 0 block 1 cannot be supervised). Blocks ``b+1..N`` are
  trained one after another with ``train_blockwise`` on ``(a_{i-1}, teacher_block_i(a_{i-1}))``
  where ``a_b`` is what devices sent and ``a_{i-1}`` for ``i > b+1`` is the candidate's own
  output of the block just trained — exactly what the device will feed that block after the
  update (the ``"student"`` input mode of ``distill``).

The gate compares candidate and deployed version on held out data: the operator's labelled
npz when configured, else a deterministic slice of the stored samples (by sample key), never
trained on, scored by agreement with the teacher. With boundary ``b`` samples both models
are scored from boundary ``b`` on (their blocks ``1..b`` are identical).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from agent.infer.manifest import BlockEntry, PartitionManifest
from agent.infer.profiles import load_profile
from agent.update.update_manifest import SignedManifest, Targets
from agent.wire.codec import CodecError
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.ingest.fleet import FleetTable
from cloud_trainer.ingest.store import Sample, SampleStore
from cloud_trainer.models.blocks import BlockModel
from cloud_trainer.models.export import (
    CURRENT_IR_MAX,
    CURRENT_OPSET,
    export_partition,
    target_for_ort,
)
from cloud_trainer.release.keys import sign_manifest
from cloud_trainer.release.publisher import make_update
from cloud_trainer.release.registry import ModelVersion, Registry, weights_digest
from cloud_trainer.release.rollout import (
    RolloutInterrupted,
    RolloutPause,
    RolloutResult,
    staged_rollout,
)
from cloud_trainer.release.runs import MAX_ATTEMPTS, Run, RunLog
from cloud_trainer.trainer_config import JobSection, ModelSection, TrainerConfig
from cloud_trainer.training.distill import (
    TrainingInterrupted,
    train_blockwise,
    train_student_blockwise_from_inputs,
)
from cloud_trainer.training.gate import DeviceGroups, GateResult, evaluate_candidate

log = logging.getLogger(__name__)


class RunError(KnetTrainerError, RuntimeError):
    """A run that cannot go on; already recorded in the run log and the registry."""


class Channel(Protocol):
    """Where signed updates go (the service's BlobPublisher over its MQTT connection)."""

    def publish(self, signed: SignedManifest, files: Mapping[str, Path],
                held: set[str]) -> None: ...

    def clear_manifest(self) -> None: ...


# -- models ---------------------------------------------------------------------------------
@dataclass
class ModelRuntime:
    """A configured zoo model: its teacher, a fresh student skeleton, its export targets."""

    model_id: str
    section: ModelSection
    teacher: BlockModel
    initial_student: BlockModel
    # (opset, ir_max) -> (profiles, the onnxruntime version to export for)
    targets: dict[tuple[int, int], tuple[list[str], str]]

    @classmethod
    def load(cls, model_id: str, section: ModelSection) -> ModelRuntime:
        pair = section.load_pair()  # zoo: trained on labels; factory: its own weights
        targets: dict[tuple[int, int], tuple[list[str], str]] = {}
        for name in section.profiles:
            ort = load_profile(name).onnxruntime
            profiles, _ = targets.setdefault(target_for_ort(ort), ([], ort))
            profiles.append(name)
        return cls(model_id, section, pair.teacher.eval(), pair.student.eval(), targets)

    def student(self, registry: Registry, version: ModelVersion) -> BlockModel:
        model = copy.deepcopy(self.initial_student)
        registry.load_into(model, version)
        return model.eval()

    @property
    def num_blocks(self) -> int:
        return self.teacher.num_blocks


def ensure_initial_version(registry: Registry, rt: ModelRuntime) -> ModelVersion:
    """Register the zoo student as version 1 (deployed) when the model has no versions.

    ``knet export`` gives devices model_version 1 of the same cached zoo student, so the
    registry's v1 is byte for byte what the fleet runs before the first update.
    """
    deployed = registry.deployed(rt.model_id)
    if deployed is not None:
        return deployed
    if registry.versions(rt.model_id):
        raise RunError(f"{rt.model_id}: no version is pushed (roll back or push one first)")
    states = [rt.initial_student.block(i).state_dict() for i in range(1, rt.num_blocks + 1)]
    v = registry.add_version(rt.model_id, states, status="pushed",
                             reason="initial zoo student (what `knet export` gives devices)",
                             info={"zoo": rt.section.zoo, "factory": rt.section.factory,
                                   "seed": rt.section.seed,
                                   "initial": True})
    log.info("registered the initial %s student as v%d (deployed)", rt.model_id, v.version)
    return v


# -- progress -------------------------------------------------------------------------------
class ProgressSink:
    """Rich progress bars on a terminal, a log line per step otherwise."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive

    @contextmanager
    def task(self, what: str) -> Iterator[Callable[[str, int, int, float], None]]:
        if not self.interactive:
            def logged(name: str, n: int, total: int, loss: float) -> None:
                log.info("%s: %s %d/%d loss %.5f", what, name, n, total, loss)
            yield logged
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                      TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(what, total=None, loss="-")

            def drawn(name: str, n: int, total: int, loss: float) -> None:
                bar.update(task, description=f"{what}: {name}", completed=n, total=total,
                           loss=f"{loss:.4f}")
            yield drawn


# -- data -----------------------------------------------------------------------------------
@dataclass
class Selection:
    boundary: int
    train: np.ndarray
    holdout: np.ndarray
    holdout_labels: np.ndarray | None
    counts: dict[int, int]
    devices: list[str]
    bad: int = 0
    holdout_devices: np.ndarray | None = None  # (len(holdout),) device of each held-out row
    train_labels: np.ndarray | None = None  # (len(train),) operator labels, -1 where none

    def summary(self) -> dict[str, Any]:
        return {"boundary": self.boundary, "train": len(self.train),
                "holdout": len(self.holdout), "by_boundary": {str(k): v for k, v in
                                                              sorted(self.counts.items())},
                "devices": self.devices, "undecodable": self.bad}


def _in_holdout(s: Sample, fraction: float) -> bool:
    key = f"{s.device}/{s.session}/{s.seq}".encode()
    return zlib.crc32(key) % 10_000 < fraction * 10_000


def _as_batch(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    if tuple(a.shape) == shape:
        return a[None]
    if tuple(a.shape[1:]) == shape:
        return a
    return None


def select_samples(store: SampleStore, rt: ModelRuntime, job: JobSection, run: Run,
                   ) -> tuple[list[Sample], dict[int, int]]:
    """The window's newest ``max_samples`` usable samples (``balance = "per_device"``: a
    max-min fair share per device, each device's newest) and the count per boundary of
    those. Memory stays bounded by ``max_samples`` however large the store."""
    picker = FairShare(job.training.max_samples) if job.training.balance == "per_device" \
        else Newest(job.training.max_samples)
    for s in store.iter_query(model_version=run.deployed_version, since=run.since):
        if s.received_at >= run.until or s.model_id not in (None, rt.model_id):
            continue
        if not 0 <= s.boundary < rt.num_blocks:
            continue
        if job.boundaries is not None and s.boundary not in job.boundaries:
            continue
        picker.add(s)
    usable = picker.samples()
    counts: dict[int, int] = {}
    for s in usable:
        counts[s.boundary] = counts.get(s.boundary, 0) + 1
    return usable, counts


class Newest:
    def __init__(self, limit: int) -> None:
        self._kept: deque[Sample] = deque(maxlen=limit)

    def add(self, s: Sample) -> None:
        self._kept.append(s)

    def samples(self) -> list[Sample]:
        return list(self._kept)


class FairShare:
    """Max-min fair shares of ``limit`` between devices, each keeping its newest: whenever
    the total passes the limit, the device holding the most drops its oldest. A device
    with fewer than its share keeps all it sent; the rest is split evenly."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._kept: dict[str, deque[Sample]] = {}
        self._total = 0

    def add(self, s: Sample) -> None:
        self._kept.setdefault(s.device, deque()).append(s)
        self._total += 1
        if self._total > self._limit:
            max(self._kept.values(), key=len).popleft()
            self._total -= 1

    def samples(self) -> list[Sample]:
        return sorted((s for q in self._kept.values() for s in q),
                      key=lambda s: s.received_at)


def split_samples(samples: list[Sample], rt: ModelRuntime, job: JobSection,
                  counts: dict[int, int]) -> Selection:
    """Decode the lowest boundary's samples and split them into train and holdout."""
    b = min(counts)
    shape = rt.teacher.boundary_shapes[b]
    train, hold, labels, hold_devices = [], [], [], []
    train_labels: list[np.ndarray] = []
    bad = 0
    chosen = [s for s in samples if s.boundary == b]
    for s in chosen:
        try:
            a = _as_batch(s.array(), shape)
        except CodecError as exc:
            log.warning("sample %s does not decode: %s", s.key, exc)
            a = None
        if a is None:
            bad += 1
            continue
        if _in_holdout(s, job.gate.holdout_fraction):
            hold.append(a)
            labels.append(-1 if s.label is None else s.label)
            hold_devices += [s.device] * len(a)
        else:
            train.append(a)
            train_labels.append(np.full(len(a), -1 if s.label is None else s.label, np.int64))
    if not hold and len(train) > 1:  # tiny windows: keep one in five out of training
        hold, train = train[::5], [a for i, a in enumerate(train) if i % 5]
        labels, hold_devices = [-1] * len(hold), []
        train_labels = [y for i, y in enumerate(train_labels) if i % 5]
    empty = np.empty((0, *shape), np.float32)
    lab = np.asarray(labels, np.int64)
    holdout = np.concatenate(hold) if hold else empty
    train_lab = np.concatenate(train_labels) if train_labels else np.empty(0, np.int64)
    return Selection(b, np.concatenate(train) if train else empty, holdout,
                     lab if len(lab) and (lab >= 0).all() else None, counts,
                     sorted({s.device for s in chosen}), bad,
                     np.asarray(hold_devices) if len(hold_devices) == len(holdout) else None,
                     train_lab if (train_lab >= 0).any() else None)


# -- training -------------------------------------------------------------------------------
@dataclass
class Trained:
    model: BlockModel
    trained: list[int] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)
    loss_before: dict[int, float] = field(default_factory=dict)
    loss_after: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # what a training mode reports

    def to_dict(self) -> dict[str, Any]:
        return {"trained": self.trained, "frozen": {str(k): v for k, v in self.frozen.items()},
                "loss_before": {str(k): v for k, v in self.loss_before.items()},
                "loss_after": {str(k): v for k, v in self.loss_after.items()}, **self.extra}


def train_candidate(teacher: BlockModel, deployed: BlockModel, sel: Selection,
                    job: JobSection,
                    progress: Callable[[str, int, int, float], None] | None = None,
                    stop: Callable[[], bool] | None = None) -> Trained:
    """Label-free block-wise KT from the selected boundary (module doc), or with
    ``training.mode`` from operator labels (``cloud_trainer/training/disagg``); ``stop`` is polled
    between optimiser steps and raises ``TrainingInterrupted``."""
    t = job.training
    if t.mode != "blockwise-kt":  # from operator labels, blocks on worker processes
        from cloud_trainer.training.disagg.candidate import train_from_labels

        res = train_from_labels(deployed, sel.train, sel.train_labels, sel.boundary, t,
                                progress, stop)
        return Trained(res.model, res.trained, res.frozen, res.loss_before, res.loss_after,
                       res.info)
    allowed = set(t.blocks) if t.blocks is not None else set(range(1, deployed.num_blocks + 1))
    n = deployed.num_blocks
    if sel.boundary == 0:
        res = train_student_blockwise_from_inputs(
            teacher, deployed, sel.train, inputs=t.raw_input_mode, epochs=t.epochs, lr=t.lr,
            batch_size=t.batch_size, temperature=t.temperature, seed=t.seed,
            progress=progress, stop=stop, bn_frozen=t.batch_norm == "frozen")
        out = Trained(res.student, [i for i in res.trained if i in allowed], {},
                      res.loss_before, res.loss_after)
        for i in range(1, n + 1):
            if i not in allowed:  # trained together, but this block may not change
                res.student.block(i).load_state_dict(deployed.block(i).state_dict())
                out.frozen[i] = "not selected"
        return out
    cand = copy.deepcopy(deployed).eval()
    out = Trained(cand)
    for i in range(1, sel.boundary + 1):
        out.frozen[i] = ("no raw inputs (boundary 0) were uplinked" if i == 1 else
                         f"boundary {sel.boundary} is the lowest uplinked")
    a = torch.from_numpy(np.ascontiguousarray(sel.train, dtype=np.float32))
    for i in range(sel.boundary + 1, n + 1):
        if i in allowed:
            res = train_blockwise(teacher, cand, {i - 1: a}, blocks=[i], epochs=t.epochs,
                                  lr=t.lr, batch_size=t.batch_size, temperature=t.temperature,
                                  seed=t.seed, progress=progress, stop=stop,
                                  bn_frozen=t.batch_norm == "frozen")
            cand = res.student
            out.trained.append(i)
            out.loss_before[i], out.loss_after[i] = res.loss_before[i], res.loss_after[i]
        else:
            out.frozen[i] = "not selected"
        with torch.no_grad():
            a = torch.cat([cand.block(i).eval()(a[k : k + 512]) for k in range(0, len(a), 512)])
    out.model = cand.eval()
    return out


def tail(model: BlockModel, boundary: int) -> BlockModel:
    """Blocks ``boundary+1..N`` of ``model`` as a model of their own (copies, eval mode)."""
    if boundary == 0:
        return model
    blocks = [copy.deepcopy(model.block(i)) for i in range(boundary + 1, model.num_blocks + 1)]
    return BlockModel(blocks, model.boundary_shapes[boundary]).eval()


def load_holdout(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise RunError(f"gate holdout {path}: {exc}") from None


def run_gate(rt: ModelRuntime, candidate: BlockModel, deployed: BlockModel, sel: Selection,
             job: JobSection) -> GateResult:
    g = job.gate
    if g.holdout is not None:
        x, y = load_holdout(g.holdout)
        ref = None if g.metric == "teacher_agreement" else y
        return evaluate_candidate(candidate, deployed, rt.teacher, x, ref, margin=g.margin)
    if g.metric == "accuracy" and sel.holdout_labels is None:
        raise RunError("gate.metric = accuracy needs gate.holdout or labelled samples")
    labels = sel.holdout_labels if g.metric == "accuracy" else None
    b = sel.boundary
    groups = DeviceGroups(sel.holdout_devices, g.device_min_samples, g.device_alpha) \
        if g.per_device and sel.holdout_devices is not None else None
    return evaluate_candidate(tail(candidate, b), tail(deployed, b), tail(rt.teacher, b),
                              sel.holdout, labels, margin=g.margin, groups=groups)


# -- export ---------------------------------------------------------------------------------
class ExportCache:
    """Block ONNX files by (target, weights sha256): only changed blocks are exported."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def block(self, model: BlockModel, index: int, target: tuple[int, int], ort: str,
              model_id: str = "block") -> tuple[Path, BlockEntry, int]:
        """The cached export of one block: (file, entry, IR version)."""
        digest = weights_digest(model.block(index).state_dict())
        d = self.root / "blocks" / f"{target[0]}-{target[1]}"
        onnx_path, meta_path = d / f"{index:02d}-{digest}.onnx", d / f"{index:02d}-{digest}.json"
        if meta_path.is_file() and onnx_path.is_file():
            meta = json.loads(meta_path.read_text())
            return onnx_path, BlockEntry.model_validate(meta["entry"]), int(meta["ir"])
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            part = export_partition(model, tmp, model_id=model_id, model_version=1,
                                    first=index, last=index, profile_ort_version=ort)
            entry = part.blocks[0]
            Path(tmp, entry.file).replace(onnx_path)  # same filesystem: atomic
        tmp_meta = meta_path.with_suffix(".tmp")
        tmp_meta.write_text(json.dumps({"entry": entry.model_dump(mode="json"),
                                        "ir": part.ir_version}))
        tmp_meta.replace(meta_path)  # written last: a crash leaves no half entry
        return onnx_path, entry, part.ir_version

    def partition(self, model: BlockModel, model_id: str, version: int,
                  target: tuple[int, int], ort: str,
                  stop: Callable[[], bool] | None = None) -> tuple[PartitionManifest, Path]:
        """A complete partition of ``version`` for one target, in its own directory.

        ``stop`` is polled before each block (an export is seconds per block with the dynamo
        exporter): ``TrainingInterrupted``, and exported blocks stay cached for the resume.
        """
        out = self.root / model_id / f"v{version}" / f"{target[0]}-{target[1]}"
        out.mkdir(parents=True, exist_ok=True)
        entries, ir = [], 0
        for i in range(1, model.num_blocks + 1):
            if stop is not None and stop():
                raise TrainingInterrupted(f"export of {model_id} v{version} stopped on request")
            src, entry, block_ir = self.block(model, i, target, ort, model_id)
            name = f"block-{i:02d}.onnx"
            dst = out / name
            if not dst.is_file() or dst.stat().st_size != entry.size:
                tmp = dst.with_suffix(".tmp")
                shutil.copyfile(src, tmp)
                tmp.replace(dst)
            entries.append(entry.model_copy(update={"file": name}))
            ir = max(ir, block_ir)
        part = PartitionManifest(
            model_id=model_id, model_version=version, role="student", opset=target[0],
            ir_version=ir, num_blocks=model.num_blocks, num_classes=model.num_classes,
            boundaries=model.boundary_shapes, blocks=tuple(entries))
        part.verify_files(out)
        part.dump(out / "manifest.json")
        return part, out


# -- the run --------------------------------------------------------------------------------
class Retrainer:
    """Runs a job's retraining end to end against the trainer's state and its channel."""

    def __init__(self, config: TrainerConfig, registry: Registry, store: SampleStore,
                 runs: RunLog, fleet: FleetTable, channel: Channel, private_key: Any,
                 models: Mapping[str, ModelRuntime], progress: ProgressSink | None = None,
                 stop: Callable[[], bool] = lambda: False,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.config, self.registry, self.store, self.runs = config, registry, store, runs
        self.fleet, self.channel, self.key, self.models = fleet, channel, private_key, models
        self.progress = progress or ProgressSink()
        self.stop, self.on_change = stop, on_change
        self.state_dir = config.trainer.state_dir
        # The operator's pause (console "pause rollout"): a file, so every process sees it.
        self.pause = RolloutPause(self.state_dir / "rollout.paused")
        self.exports = ExportCache(self.state_dir / "exports")
        self.manifests = self.state_dir / "manifests"

    # --- entry point
    def run(self, job_id: str, trigger: str = "schedule") -> Run:
        """Resume the job's interrupted run if there is one, else start a new one."""
        job = self.config.job(job_id)
        rt = self.models[job.model]
        deployed = ensure_initial_version(self.registry, rt)
        run = self.runs.interrupted(job_id)
        if run is not None:
            run = self.runs.resume(run.run_id)
            log.warning("run %s of job %s was interrupted at %s; resuming (attempt %d)",
                        run.run_id, job_id, run.step, run.attempts)
            if run.attempts > MAX_ATTEMPTS:
                return self._fail(run, f"interrupted {run.attempts - 1} times; given up")
        elif (pending := self._approved_rollback(rt.model_id, deployed)) is not None:
            run = self.runs.open_run(job_id, rt.model_id, "rollback", since=0.0, until=0.0,
                                     deployed_version=deployed.version)
            run = self.runs.update(run.run_id, version=pending.version,
                                   detail={"rollback_of": pending.info.get("rollback_of")})
            log.info("run %s of job %s: pushing %s v%d (%s)", run.run_id, job_id,
                     rt.model_id, pending.version, pending.reason)
        else:
            run = self.runs.open_run(job_id, rt.model_id, trigger,
                                     since=self.runs.last_window_end(job_id),
                                     until=time.time(), deployed_version=deployed.version)
            log.info("run %s of job %s: %s v%d, samples since %.0f", run.run_id, job_id,
                     rt.model_id, deployed.version, run.since)
        try:
            run = self._execute(run, job, rt)
        except RolloutInterrupted:
            log.warning("run %s interrupted during its rollout; the next run resumes it",
                        run.run_id)
            return self.runs.get(run.run_id)
        except TrainingInterrupted:
            log.warning("run %s interrupted while training or exporting (the trainer is "
                        "stopping); the next start resumes it", run.run_id)
            return self.runs.get(run.run_id)
        except RunError as exc:
            run = self._fail(run, str(exc))
        except Exception as exc:  # any bug ends the run as failed, never left "running"
            log.exception("run %s of job %s failed", run.run_id, job_id)
            run = self._fail(run, f"{type(exc).__name__}: {exc}")
        self.on_change()
        return run

    def _fail(self, run: Run, reason: str) -> Run:
        if run.version is not None:
            v = self.registry.get(run.model_id, run.version)
            if v.status in ("candidate", "approved"):
                self.registry.set_status(run.model_id, run.version, "failed", reason)
        log.error("run %s failed: %s", run.run_id, reason)
        return self.runs.update(run.run_id, status="failed", reason=reason)

    def _approved_rollback(self, model_id: str, deployed: ModelVersion) -> ModelVersion | None:
        """A version an operator approved (``models rollback``) that no run has pushed."""
        for v in reversed(self.registry.versions(model_id)):
            if v.version > deployed.version and v.status == "approved" and \
                    "run_id" not in v.info:
                return v
        return None

    def _execute(self, run: Run, job: JobSection, rt: ModelRuntime) -> Run:
        deployed_v = self.registry.get(rt.model_id, run.deployed_version)  # type: ignore[arg-type]
        deployed = rt.student(self.registry, deployed_v)
        if run.trigger == "rollback":  # operator-approved: no training, no gate
            version = self.registry.get(rt.model_id, run.version)  # type: ignore[arg-type]
            if version.status in ("pushed", "superseded"):
                return self.runs.update(run.run_id, status="pushed", reason=version.reason)
            if version.status != "approved":
                raise RunError(f"v{version.version} is {version.status}, not approved")
            model = rt.student(self.registry, version)
            return self._push(run, job, rt, version, model, deployed, deployed_v)
        upper = self.store.count(model_version=run.deployed_version, since=run.since)
        if upper < job.min_new_samples and self._candidate(run) is None:
            samples, counts = [], {}  # cheap: no scan of payloads for a run that is skipped
        else:
            samples, counts = select_samples(self.store, rt, job, run)
        new = sum(counts.values())
        if new < job.min_new_samples and self._candidate(run) is None:
            return self.runs.update(run.run_id, status="skipped", step="select",
                                    reason=f"{new} new samples < min_new_samples "
                                           f"{job.min_new_samples}",
                                    detail={"by_boundary": {str(k): v for k, v in
                                                            counts.items()}})
        sel = split_samples(samples, rt, job, counts)
        if len(sel.train) == 0 or len(sel.holdout) == 0:
            if self._candidate(run) is not None:  # resumed, but its samples expired since
                raise RunError("the run's samples are gone (retention); cannot gate it")
            return self.runs.update(run.run_id, status="skipped", step="select",
                                    reason="no decodable samples for both training and "
                                           "holdout", detail={"selection": sel.summary()})
        run = self.runs.update(run.run_id, step="train", consumed=True,
                               detail={"selection": sel.summary()})
        version, candidate = self._train_step(run, job, rt, deployed, deployed_v, sel)
        run = self.runs.update(run.run_id, version=version.version, step="gate")
        version = self._gate_step(run, job, rt, candidate, deployed, sel, version)
        if version.status == "rejected":
            return self.runs.update(run.run_id, status="rejected", reason=version.reason,
                                    detail={"gate": version.scores.get("gate")})
        if version.status in ("pushed", "superseded"):  # finished before an interruption
            return self.runs.update(run.run_id, status="pushed", reason=version.reason)
        if version.status == "failed":
            return self.runs.update(run.run_id, status="failed", reason=version.reason)
        return self._push(run, job, rt, version, candidate, deployed, deployed_v)

    def _push(self, run: Run, job: JobSection, rt: ModelRuntime, version: ModelVersion,
              candidate: BlockModel, deployed: BlockModel, deployed_v: ModelVersion) -> Run:
        """Export → sign → staged rollout → record, for an approved version."""
        run = self.runs.update(run.run_id, step="export")
        variants = self._export_step(rt, candidate, version.version)
        run = self.runs.update(run.run_id, step="publish")
        held = self._held_shas(rt, deployed, deployed_v)
        result = self._rollout_step(run, job, rt, version.version, variants, held)
        detail = {"rollout": result.to_dict()}
        if not result.ok:
            self.registry.set_status(rt.model_id, version.version, "failed", result.reason,
                                     scores={"rollout": result.to_dict()})
            return self.runs.update(run.run_id, status="rollout_failed", reason=result.reason,
                                    detail=detail)
        self.registry.set_status(rt.model_id, version.version, "pushed", result.reason,
                                 scores={"rollout": result.to_dict()})
        log.info("run %s: %s v%d pushed (%s)", run.run_id, rt.model_id, version.version,
                 result.reason)
        return self.runs.update(run.run_id, status="pushed", reason=result.reason,
                                detail=detail)

    # --- steps
    def _candidate(self, run: Run) -> ModelVersion | None:
        for v in reversed(self.registry.versions(run.model_id)):
            if v.info.get("run_id") == run.run_id:
                return v
        return None

    def _train_step(self, run: Run, job: JobSection, rt: ModelRuntime, deployed: BlockModel,
                    deployed_v: ModelVersion, sel: Selection) -> tuple[ModelVersion, BlockModel]:
        existing = self._candidate(run)
        if existing is not None:
            log.info("run %s: candidate v%d already trained", run.run_id, existing.version)
            return existing, rt.student(self.registry, existing)
        with self.progress.task(f"{job.id} train") as bar:
            trained = train_candidate(rt.teacher, deployed, sel, job, bar, stop=self.stop)
        states = [trained.model.block(i).state_dict() for i in range(1, rt.num_blocks + 1)]
        version = self.registry.add_version(
            rt.model_id, states, parent=deployed_v.version, status="candidate",
            window={"since": run.since, "until": run.until, **sel.summary()},
            info={"run_id": run.run_id, "job": job.id, **trained.to_dict()})
        changed = version.changed_blocks(deployed_v)
        self.runs.update(run.run_id, detail={"training": trained.to_dict(),
                                             "changed_blocks": changed})
        log.info("run %s: candidate v%d, trained blocks %s, frozen %s, changed %s",
                 run.run_id, version.version, trained.trained, trained.frozen, changed)
        return version, trained.model

    def _gate_step(self, run: Run, job: JobSection, rt: ModelRuntime, candidate: BlockModel,
                   deployed: BlockModel, sel: Selection,
                   version: ModelVersion) -> ModelVersion:
        if version.status != "candidate":  # decided before an interruption
            return version
        parent = self.registry.get(rt.model_id, run.deployed_version)  # type: ignore[arg-type]
        if not version.changed_blocks(parent):
            return self.registry.set_status(rt.model_id, version.version, "rejected",
                                            "no block changed")
        gate = run_gate(rt, candidate, deployed, sel, job)
        scores = {"gate": gate.to_dict()}
        passed, reason = gate.passed, gate.reason
        need = job.gate.min_improvement
        if passed and need is not None and gate.delta < need:
            passed = False
            reason = (f"candidate rejected: gained {gate.delta:.2f} points, "
                      f"min_improvement {need:.2f}")
        status = "approved" if passed else "rejected"
        return self.registry.set_status(rt.model_id, version.version, status, reason,
                                        scores=scores)

    def _export_step(self, rt: ModelRuntime, model: BlockModel,
                     version: int) -> dict[str, tuple[PartitionManifest, Path]]:
        variants: dict[str, tuple[PartitionManifest, Path]] = {}
        has_default = (CURRENT_OPSET, CURRENT_IR_MAX) in rt.targets
        for target, (profiles, ort) in rt.targets.items():
            default = target == (CURRENT_OPSET, CURRENT_IR_MAX) or (
                not has_default and len(rt.targets) == 1)
            variants["" if default else ",".join(profiles)] = self.exports.partition(
                model, rt.model_id, version, target, ort, stop=self.stop)
        return variants

    def _held_shas(self, rt: ModelRuntime, deployed: BlockModel,
                   deployed_v: ModelVersion) -> set[str]:
        """ONNX shas of the deployed version's blocks: devices hold them, never pushed."""
        held = set()
        for target, (_profiles, ort) in rt.targets.items():
            for i in range(1, rt.num_blocks + 1):
                held.add(self.exports.block(deployed, i, target, ort, rt.model_id)[1].sha256)
        return held

    def _signed(self, rt: ModelRuntime, version: int, stage: str,
                variants: Mapping[str, tuple[PartitionManifest, Path]],
                targets: Targets) -> tuple[SignedManifest, dict[str, Path]]:
        """The stage's signed manifest, written before it is published, re-used on resume."""
        manifest, files = make_update(self.config.trainer.fleet, rt.model_id, version,
                                      dict(variants), targets)
        path = self.manifests / rt.model_id / f"v{version}-{stage}-{_targets_key(targets)}.json"
        if path.is_file():
            signed = SignedManifest.model_validate_json(path.read_bytes())
            return signed, files
        signed = sign_manifest(manifest, self.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(signed.payload())
        tmp.replace(path)
        return signed, files

    def current_manifest_path(self, model_id: str) -> Path:
        return self.manifests / model_id / "current.json"

    def _rollout_step(self, run: Run, job: JobSection, rt: ModelRuntime, version: int,
                      variants: Mapping[str, tuple[PartitionManifest, Path]],
                      held: set[str]) -> RolloutResult:
        def publish(targets: Targets, stage: str) -> None:
            signed, files = self._signed(rt, version, stage, variants, targets)
            self.channel.publish(signed, files, held)
            self.runs.update(run.run_id, detail={f"published_{stage}": targets.model_dump()})
            if stage == "all":
                current = self.current_manifest_path(rt.model_id)
                tmp = current.with_suffix(".tmp")
                tmp.write_bytes(signed.payload())
                tmp.replace(current)

        def restore() -> None:
            current = self.current_manifest_path(rt.model_id)
            if current.is_file():
                signed = SignedManifest.model_validate_json(current.read_bytes())
                self.channel.publish(signed, {}, held)
            else:
                self.channel.clear_manifest()

        return staged_rollout(self.config.rollout, job, self.fleet, self.runs, rt.model_id,
                              version, publish, restore, self.stop, pause=self.pause)


def _targets_key(targets: Targets) -> str:
    raw = json.dumps(targets.model_dump(), sort_keys=True).encode()
    return f"{zlib.crc32(raw):08x}"
