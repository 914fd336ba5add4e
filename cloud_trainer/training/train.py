"""Supervised training of zoo models on their bundled data, cached per seed.

This is the *initial* training of a pair on labels (the student trained alone here); the
label-free, block-wise supervision of students by their teacher lives in ``distill``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from cloud_trainer.models.blocks import BlockModel, ModelPair
from cloud_trainer.models.data import digits_splits, vision_frames
from cloud_trainer.models.scenes import IN_SCENE, OUT_OF_SCENE
from cloud_trainer.models.zoo import get_pair, zoo_entry

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float], None]
SceneSplit = Literal["train", "in-scene", "out-of-scene"]
"""Called after every epoch with (what, epoch, epochs, mean loss); the CLI draws bars."""


EFFNET_EPOCHS, EFFNET_TRAIN_PER_SCENE = 5, 320


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int = 64
    shift: int = 0  # random translation in pixels (augmentation)
    temperature: float = 4.0  # distillation only (a pretrained teacher's student)
    freeze: tuple[int, ...] = ()  # distillation: blocks copied whole from the teacher
    bn_frozen: bool = False  # distillation: batch norms keep their running statistics


RECIPES = {"digits": Recipe(epochs=30, lr=3e-3, shift=1), "vision": Recipe(epochs=5, lr=3e-3),
           # the student's label-free block-wise KT against the pretrained teacher
           "effnet-lite0": Recipe(epochs=EFFNET_EPOCHS, lr=3e-3, batch_size=32,
                                  temperature=1.0, freeze=(1, 2), bn_frozen=True)}
VISION_TRAIN, VISION_TEST = 1600, 512
# effnet-lite0 frames: per scene, which photos, seed base (cloud_trainer.models.scenes)
SCENE_SPLITS: dict[str, tuple[int, tuple[str, ...], int]] = {
    "train": (EFFNET_TRAIN_PER_SCENE, IN_SCENE, 1000),
    "in-scene": (32, IN_SCENE, 5000),
    "out-of-scene": (120, OUT_OF_SCENE, 7000),
}
CACHE_FORMAT = 2  # bump when the cached file's content changes meaning


def default_cache_dir() -> Path:
    """``$KNET_CACHE/zoo`` (``$KNET_CACHE`` is knet's cache root), else ``~/.cache/knet/zoo``."""
    return Path(os.environ.get("KNET_CACHE", Path.home() / ".cache" / "knet")) / "zoo"


@contextlib.contextmanager
def training_context(seed: int, threads: int | None) -> Iterator[None]:
    """Seeded, deterministic, and with a fixed intra-op thread count; all restored after.

    Why a thread count: these models are small, so intra-op threads gain little, and on a
    shared two-core machine torch's OpenMP barriers collapse (measured 10× slower steps)
    whenever another process holds a core. One thread also fixes the reduction order,
    which keeps results bit-identical for a seed.
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(seed)
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def train_data(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training inputs and labels (for ``effnet-lite0``: the teacher's top-1 on each frame)."""
    if name == "digits":
        s = digits_splits()
        return s.x_train, s.y_train
    if name == "effnet-lite0":
        return scene_set("train", seed)
    return vision_frames(VISION_TRAIN, seed=1000 + seed)


def eval_set(name: str, seed: int = 0, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs with labels (the digits test split; fresh vision frames; fresh frames
    of the training scenes labelled by the teacher's top-1 on them, undrifted)."""
    if name == "digits":
        s = digits_splits()
        x, y = s.x_test, s.y_test
    elif name == "effnet-lite0":
        x, y = scene_set("in-scene", seed)
    else:
        x, y = vision_frames(n or VISION_TEST, seed=5000 + seed)
    return (x[:n], y[:n]) if n else (x, y)


@functools.lru_cache(maxsize=8)
def scene_set(split: SceneSplit, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``effnet-lite0`` frames of real photos (``cloud_trainer.models.scenes``), labelled with the
    pretrained teacher's top-1: the label a user cares about is what the teacher says of the
    frame as the camera took it (before any drift). Read-only arrays, cached per process.

    ``train`` and ``in-scene`` are disjoint frames (other seeds) of the training photos;
    ``out-of-scene`` frames come from photos never trained on.
    """
    from cloud_trainer.models import scenes
    from cloud_trainer.models.zoo.effnet import IMAGE_SIZE

    per_scene, names, base = SCENE_SPLITS[split]
    x, _ = scenes.frames(names, per_scene, IMAGE_SIZE, seed=base + seed)
    y = teacher_top1(get_pair("effnet-lite0").teacher, x)
    for a in (x, y):
        a.setflags(write=False)
    return x, y


@torch.no_grad()
def teacher_top1(teacher: BlockModel, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    teacher.eval()
    out = [teacher(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).argmax(1)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.int64)


def model_inputs(name: str, n: int, seed: int = 0) -> np.ndarray:
    x, _ = eval_set(name, seed)
    if len(x) < n:
        x = np.concatenate([x] * (n // len(x) + 1))
    return np.ascontiguousarray(x[:n])


def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in x and y, filling with zeros."""
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (pixels,) * 4)
    span = 2 * pixels + 1
    dy = torch.randint(0, span, (n,), generator=gen)
    dx = torch.randint(0, span, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(span):
        for ox in range(span):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out


def total_steps(n: int, epochs: int, batch_size: int) -> int:
    """Optimiser steps for ``epochs`` passes over ``n`` samples (for LR schedules)."""
    return epochs * ((n + batch_size - 1) // batch_size)


def minibatches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches; one ``randperm`` draw per epoch from ``gen``."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train_supervised(model: BlockModel, x: np.ndarray, y: np.ndarray, *, epochs: int,
                     lr: float, seed: int = 0, batch_size: int = 64, shift: int = 0,
                     progress: Progress | None = None, what: str = "model",
                     threads: int | None = 1) -> BlockModel:
    """Adam + one-cycle schedule on cross-entropy; deterministic for a seed.

    Returns the model in eval mode. ``threads=None`` keeps torch's current thread count.
    """
    with training_context(seed, threads):
        return _train(model, x, y, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
                      shift=shift, progress=progress, what=what)


def _train(model: BlockModel, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
           seed: int, batch_size: int, shift: int, progress: Progress | None,
           what: str) -> BlockModel:
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.array(x, np.float32)), torch.from_numpy(np.array(y, np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps(len(xt), epochs, batch_size))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for idx in minibatches(len(xt), batch_size, gen):
            xb = random_shift(xt[idx], shift, gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.debug("%s epoch %d/%d loss %.4f", what, epoch + 1, epochs, total / len(xt))
        if progress:
            progress(what, epoch + 1, epochs, total / len(xt))
    return model.eval()


@torch.no_grad()
def evaluate(model: BlockModel, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        out = model(torch.from_numpy(np.array(x[start : start + batch_size], np.float32)))
        correct += int((out.argmax(1).numpy() == y[start : start + batch_size]).sum())
    return correct / len(x)


def _arch_key(pair: ModelPair, recipe: Recipe) -> str:
    """Names the architecture and recipe: layer reprs, parameter shapes, boundaries."""
    parts = [repr(recipe), str(CACHE_FORMAT)]
    for model in (pair.teacher, pair.student):
        parts.append(repr(model))
        parts += [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
        parts.append(repr(model.boundary_shapes))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def cache_path(name: str, seed: int = 0, cache_dir: Path | str | None = None) -> Path:
    """Where ``trained_pair(name, seed)`` keeps its weights."""
    return _cache_file(get_pair(name, seed), name, seed, cache_dir)


def _cache_file(pair: ModelPair, name: str, seed: int, cache_dir: Path | str | None) -> Path:
    key = _arch_key(pair, RECIPES[name])
    return Path(cache_dir or default_cache_dir()) / f"{name}-seed{seed}-{key}.pt"


def trained_pair(name: str, seed: int = 0, cache_dir: Path | str | None = None,
                 progress: Progress | None = None) -> ModelPair:
    """The zoo pair trained on labels (teacher and student each alone), cached on disk.

    The cache key is name + seed + a hash of the architecture and recipe, so editing a
    model retrains it instead of loading mismatched weights. A cache file that cannot be
    read is logged and replaced. ``pair.metrics`` holds test accuracies and train seconds.
    """
    pair = get_pair(name, seed)
    recipe = RECIPES[name]
    path = _cache_file(pair, name, seed, cache_dir)
    pretrained = zoo_entry(name).pretrained
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            pair.teacher.load_state_dict(state["teacher"])
            pair.student.load_state_dict(state["student"])
            pair.metrics.update(state.get("metrics", {}))
            log.debug("loaded %s seed %d from %s", name, seed, path)
            return pair.eval()
        except Exception as exc:  # a truncated or foreign file: retrain
            log.warning("cache %s unusable (%s); retraining", path, exc)
            pair = get_pair(name, seed)
    if pretrained:
        _distil_pretrained(pair, name, recipe, seed, progress)
    else:
        _train_both(pair, name, recipe, seed, progress)
    log.info("trained %s seed %d: %s", name, seed, pair.metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"teacher": pair.teacher.state_dict(), "student": pair.student.state_dict(),
                "metrics": pair.metrics, "recipe": asdict(recipe)}, tmp)
    tmp.replace(path)
    return pair.eval()


def _train_both(pair: ModelPair, name: str, recipe: Recipe, seed: int,
                progress: Progress | None) -> None:
    """Teacher and student each trained alone on the labels."""
    x, y = train_data(name, seed)
    xte, yte = eval_set(name, seed)
    for role, model in (("teacher", pair.teacher), ("student", pair.student)):
        t0 = time.perf_counter()
        train_supervised(model, x, y, epochs=recipe.epochs, lr=recipe.lr,
                         batch_size=recipe.batch_size, seed=seed, shift=recipe.shift,
                         progress=progress, what=f"{name} {role}")
        pair.metrics[f"{role}_train_s"] = round(time.perf_counter() - t0, 2)
        pair.metrics[f"{role}_accuracy"] = evaluate(model, xte, yte)


def _distil_pretrained(pair: ModelPair, name: str, recipe: Recipe, seed: int,
                       progress: Progress | None) -> None:
    """The student learns the pretrained teacher block by block, label-free, on the
    training frames (``student+boundary`` inputs; ``cloud_trainer.training.distill``): inner blocks
    regress the teacher's boundaries, the last matches its logits (KD at
    ``recipe.temperature``) and its top-1 (cross-entropy on the teacher's own prediction — no
    human label anywhere). Accuracies are top-1 agreement with the teacher on the frame."""
    from cloud_trainer.training.distill import train_student_blockwise_from_inputs

    x, y = train_data(name, seed)  # y: the teacher's top-1 on each frame
    res = train_student_blockwise_from_inputs(
        pair.teacher, pair.student, x, labels=y, alpha=0.5, inputs="student+boundary",
        epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
        temperature=recipe.temperature, seed=seed, threads=None, progress=progress,
        freeze=recipe.freeze, bn_frozen=recipe.bn_frozen)
    pair.student = res.student.eval()
    pair.metrics["student_train_s"] = res.seconds
    pair.metrics["teacher_accuracy"] = 1.0  # agreement with itself: the labels are its own
    for split in ("in-scene", "out-of-scene"):
        xe, ye = scene_set(split, seed)  # type: ignore[arg-type]
        pair.metrics[f"student_accuracy_{split}"] = evaluate(pair.student, xe, ye)
    pair.metrics["student_accuracy"] = pair.metrics["student_accuracy_in-scene"]
