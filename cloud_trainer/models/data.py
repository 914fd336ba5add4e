"""Real data that ships inside packages, so nothing is downloaded at run time.

``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes).
``vision``: frames cut from the two photos scikit-learn bundles (``load_sample_images``):
random crops at random scales, resized to 96×96, labelled by (photo, quadrant of the crop's
centre) — a real, learnable 8-class task so the vision model has meaningful features.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VISION_SIZE = 96
VISION_CLASSES = 8
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@lru_cache(maxsize=4)
def digits_splits(split_seed: int = 0, test_fraction: float = 0.3) -> Split:
    """Stratified split of load_digits, float32 (N, 1, 8, 8) in [0, 1].

    The split seed is separate from the model seed so every model is scored on one test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    for a in (xtr, xte, ytr, yte):
        a.setflags(write=False)
    return Split(xtr, ytr, xte, yte)


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(img) for img in load_sample_images().images)


def vision_frames(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normalised frames (N, 3, 96, 96) float32 and their labels (N,) int64."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    x = np.empty((n, 3, VISION_SIZE, VISION_SIZE), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        p = int(rng.integers(len(photos)))
        img = photos[p]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.18, 0.45) * min(h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[top : top + side, left : left + side])
        crop = crop.resize((VISION_SIZE, VISION_SIZE), Image.BILINEAR)
        arr = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0
        if rng.random() < 0.5:
            arr = arr[:, :, ::-1]
        x[i] = (arr - _MEAN) / _STD
        cy, cx = top + side / 2, left + side / 2
        y[i] = p * 4 + int(cy >= h / 2) * 2 + int(cx >= w / 2)
    return x, y
