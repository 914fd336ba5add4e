"""Supervised training of zoo models on their bundled data, cached per seed.

This is the *initial* training of a pair on labels (the student trained alone here); the
label-free, block-wise supervision of students by their teacher lives in ``distill``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cloud_trainer.blocks import BlockModel, ModelPair
from cloud_trainer.data import digits_splits, vision_frames
from cloud_trainer.zoo import get_pair

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float], None]  # (what, epoch, epochs, loss)


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int = 64
    shift: int = 0  # random translation in pixels (augmentation)


RECIPES = {"digits": Recipe(epochs=30, lr=3e-3, shift=1), "vision": Recipe(epochs=5, lr=3e-3)}
VISION_TRAIN, VISION_TEST = 1600, 512


def cache_dir() -> Path:
    return Path(os.environ.get("KNET_CACHE", Path.home() / ".cache" / "knet")) / "zoo"


def train_data(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        s = digits_splits()
        return s.x_train, s.y_train
    return vision_frames(VISION_TRAIN, seed=1000 + seed)


def eval_set(name: str, seed: int = 0, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs with labels (the digits test split; fresh vision frames)."""
    if name == "digits":
        s = digits_splits()
        x, y = s.x_test, s.y_test
    else:
        x, y = vision_frames(n or VISION_TEST, seed=5000 + seed)
    return (x[:n], y[:n]) if n else (x, y)


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


def train_supervised(model: BlockModel, x: np.ndarray, y: np.ndarray, *, epochs: int,
                     lr: float, batch_size: int = 64, seed: int = 0, shift: int = 0,
                     progress: Progress | None = None, what: str = "model") -> BlockModel:
    """Adam + cosine schedule on cross-entropy; deterministic for a seed."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.array(x, np.float32)), torch.from_numpy(np.array(y, np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            xb = random_shift(xt[idx], shift, gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
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
    text = f"{pair.teacher}|{pair.student}|{recipe}|v1"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trained_pair(name: str, seed: int = 0, cache: Path | None = None,
                 progress: Progress | None = None) -> ModelPair:
    """The zoo pair trained on labels (teacher and student each alone), cached on disk."""
    pair = get_pair(name, seed)
    recipe = RECIPES[name]
    path = (cache or cache_dir()) / f"{name}-seed{seed}-{_arch_key(pair, recipe)}.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        pair.teacher.load_state_dict(state["teacher"])
        pair.student.load_state_dict(state["student"])
        pair.teacher.eval()
        pair.student.eval()
        return pair
    x, y = train_data(name, seed)
    t0 = time.perf_counter()
    for role, model in (("teacher", pair.teacher), ("student", pair.student)):
        train_supervised(model, x, y, epochs=recipe.epochs, lr=recipe.lr,
                         batch_size=recipe.batch_size, seed=seed, shift=recipe.shift,
                         progress=progress, what=f"{name} {role}")
    log.info("trained %s seed %d in %.1f s", name, seed, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"teacher": pair.teacher.state_dict(), "student": pair.student.state_dict()}, tmp)
    tmp.replace(path)
    return pair
