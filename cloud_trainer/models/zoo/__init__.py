"""The model zoo: teacher/student pairs with identical block boundaries.

``get_pair(name, seed)`` builds a deterministically initialised pair;
``cloud_trainer.training.train.trained_pair`` trains (and caches) it. Entries whose teacher comes
pretrained (``effnet-lite0``) get their teacher's weights here and only their student
is trained, label-free, against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cloud_trainer.models.blocks import ModelPair
from cloud_trainer.models.zoo import digits, effnet, vision


@dataclass(frozen=True)
class ZooEntry:
    """How to build a pair, and what its inputs are."""

    build: Callable[[], ModelPair]
    pretrained: bool = False  # teacher weights ship with it; the student is distilled
    pixel_input: bool = True  # boundary 0 is pixels in [0, 1] (drifts apply as they are)


_ENTRIES: dict[str, ZooEntry] = {
    "digits": ZooEntry(digits.build_pair),
    "vision": ZooEntry(vision.build_pair, pixel_input=False),  # ImageNet-normalised
    "effnet-lite0": ZooEntry(effnet.build_pair, pretrained=True),
}


def zoo_names() -> list[str]:
    return sorted(_ENTRIES)


def zoo_entry(name: str) -> ZooEntry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; choose from {', '.join(zoo_names())}") from None


def get_pair(name: str, seed: int = 0) -> ModelPair:
    entry = zoo_entry(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return entry.build()
