"""Real photos as camera scenes, with nothing downloaded: what a fleet of cameras sees.

The photos ship inside packages: scikit-image's ``skimage.data`` (only those inside its
wheel; some of its images need a download and are not used) and scikit-learn's
``load_sample_images``. A camera sees one scene, so frames of a scene are random crops of
its photo at random scales and aspect ratios, flipped, with brightness/contrast/saturation
jitter — what pointing, zoom and exposure change from frame to frame.

Two held-out sets, as the real-models issue asks: *in-scene* frames are fresh frames (other
seeds) of the training photos — a deployed camera that keeps looking at its scene — and
*out-of-scene* frames come from photos never used for training (:data:`OUT_OF_SCENE`).

Frames are RGB in [0, 1], float32, (N, 3, S, S): pixels, not normalised; the model does
its own input scaling, so a device feeds what its camera gives and drifts act on pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cloud_trainer.errors import KnetTrainerError

# name -> loader; grey photos are repeated to three channels.
IN_SCENE: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble", "retina",
    "china", "brick", "clock", "grass", "gravel", "moon", "page", "text",
)
OUT_OF_SCENE: tuple[str, ...] = ("camera", "coins", "flower", "immunohistochemistry")
SCENES: tuple[str, ...] = IN_SCENE + OUT_OF_SCENE


class SceneError(KnetTrainerError, ValueError):
    """An unknown scene name, or a photo its package no longer ships."""


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        img = getattr(data, name)()
        return img[0] if isinstance(img, tuple) else img

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        names = [str(f).rsplit("/", 1)[-1] for f in bunch.filenames]
        return np.asarray(bunch.images[names.index(filename)])

    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    **{n: _skimage(n) for n in ("astronaut", "chelsea", "coffee", "rocket", "retina", "brick",
                                "clock", "grass", "gravel", "moon", "page", "text", "camera",
                                "coins", "immunohistochemistry")},
    "motorcycle": _skimage("stereo_motorcycle"),
    "hubble": _skimage("hubble_deep_field"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}


@lru_cache(maxsize=len(SCENES))
def photo(name: str) -> np.ndarray:
    """The scene's photo as (H, W, 3) uint8 RGB (read-only)."""
    if name not in _LOADERS:
        raise SceneError(f"no scene {name!r}; choose from {', '.join(SCENES)}")
    try:
        img = np.asarray(_LOADERS[name]())
    except (ImportError, AttributeError, OSError, ValueError) as exc:
        raise SceneError(f"scene {name!r}: its photo could not be loaded ({exc}); "
                         "install scikit-image and scikit-learn (knet[trainer])") from None
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype == bool \
            else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, :3])
    img.setflags(write=False)
    return img


@dataclass(frozen=True)
class FrameStyle:
    """How much a camera's view varies between frames."""

    min_scale: float = 0.3  # crop side as a fraction of the photo's shorter side
    max_aspect: float = 4 / 3
    flip: bool = True
    jitter: float = 0.2  # brightness, contrast, saturation: ×(1 ± jitter)


def _jitter(rgb: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    if amount <= 0:
        return rgb
    b, c, s = rng.uniform(1 - amount, 1 + amount, 3)
    grey = rgb.mean(axis=0, keepdims=True)
    out = grey + (rgb - grey) * s  # saturation
    out = out.mean() + (out - out.mean()) * c  # contrast
    return np.clip(out * b, 0.0, 1.0)  # brightness


def scene_frames(scene: str, n: int, size: int, seed: int = 0,
                 style: FrameStyle = FrameStyle()) -> np.ndarray:
    """``n`` frames (n, 3, size, size) float32 RGB in [0, 1] of one scene; same seed, same
    frames."""
    from PIL import Image

    img = Image.fromarray(photo(scene))
    w, h = img.size
    rng = np.random.default_rng([seed, SCENES.index(scene)])
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        side = rng.uniform(style.min_scale, 1.0) * min(w, h)
        aspect = np.exp(rng.uniform(-1, 1) * np.log(style.max_aspect))
        cw, ch = min(w, side * np.sqrt(aspect)), min(h, side / np.sqrt(aspect))
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        crop = img.resize((size, size), Image.BILINEAR,
                          box=(left, top, left + cw, top + ch))
        rgb = np.asarray(crop, np.float32).transpose(2, 0, 1) / 255.0
        if style.flip and rng.random() < 0.5:
            rgb = rgb[:, :, ::-1]
        out[i] = _jitter(rgb, style.jitter, rng)
    return out


def frames(scenes: Sequence[str], per_scene: int, size: int,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames of several scenes, interleaved (scene 0, 1, …, 0, 1, …), and each frame's
    scene index into ``scenes``."""
    parts = [scene_frames(s, per_scene, size, seed) for s in scenes]
    x = np.stack(parts, axis=1).reshape(-1, 3, size, size)
    idx = np.tile(np.arange(len(scenes)), per_scene)
    return np.ascontiguousarray(x), idx
