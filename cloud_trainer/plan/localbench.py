"""``knet plan bench``: the device benchmark (``agent.infer.blockbench``) run here on a zoo model.

The model is exported for the profile exactly as for a device, loaded into a
``BlockRunner`` with that profile, and measured on real inputs of the model's dataset. The
record says which machine measured it: figures for a profile taken on another machine
must be scaled in ``network.toml`` (``time_scale``).
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from agent.infer.blockbench import DEFAULT_CODECS, BenchRecord, measure


def bench_model(model: str, profile: str, *, role: str = "student", seed: int = 0,
                samples: int = 32, warmup: int = 5, repeats: int = 30,
                codecs: tuple[str, ...] = DEFAULT_CODECS, device: str | None = None,
                weights: Path | str | None = None, input_shape: Sequence[int] | str | None = None,
                cuts: str | Sequence[str] | None = None) -> BenchRecord:
    """Export ``model`` (a zoo name or ``package.module:factory``; ``cuts`` re-cuts it at
    traced candidates) for ``profile`` and measure its blocks here.

    Inputs are the zoo model's own data; a factory model (or a zoo model whose data do not
    fit its input) gets generated inputs, and the record says so (``inputs``).
    """
    from agent.infer.blockbench import generated_inputs
    from agent.infer.profiles import load_profile
    from agent.infer.runtime import BlockRunner
    from cloud_trainer.models.export import export_for_profile
    from cloud_trainer.models.zoo.refs import ModelRef

    prof = load_profile(profile)
    ref = ModelRef.parse(model)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_for_profile(model, profile, Path(tmp), seed=seed, role=role,
                                      weights=weights, input_shape=input_shape, cuts=cuts)
        runner = BlockRunner(manifest, Path(tmp), prof)
        shape = tuple(manifest.boundaries[0])
        x = _zoo_inputs(ref.zoo, samples, seed, shape) if ref.zoo else None
        kind: Literal["source", "generated"] = "source"
        if x is None:
            x, kind = generated_inputs(shape, samples, seed), "generated"
        return measure(runner, x, device=device or _local_name(), codecs=codecs,
                       warmup=warmup, repeats=repeats, spool_dir=Path(tmp), inputs=kind)


def _zoo_inputs(name: str, n: int, seed: int, shape: tuple[int, ...]) -> np.ndarray | None:
    from cloud_trainer.training.train import model_inputs

    x = model_inputs(name, n, seed=seed)
    return x if tuple(x.shape[1:]) == shape else None


def _local_name() -> str:
    import re

    name = re.sub(r"[^a-z0-9-]", "-", platform.node().lower()).strip("-")
    return name[:63] or "local"
