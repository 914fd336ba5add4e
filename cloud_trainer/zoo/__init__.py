"""The model zoo: teacher/student pairs with identical block boundaries.

``get_pair(name, seed)`` builds an untrained, deterministically initialised pair;
``cloud_trainer.train.trained_pair`` trains (and caches) it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cloud_trainer.blocks import ModelPair
from cloud_trainer.zoo import digits, vision

_BUILDERS: dict[str, Callable[[], ModelPair]] = {
    "digits": digits.build_pair,
    "vision": vision.build_pair,
}


def zoo_names() -> list[str]:
    return sorted(_BUILDERS)


def get_pair(name: str, seed: int = 0) -> ModelPair:
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; choose from {', '.join(zoo_names())}") from None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return builder()
