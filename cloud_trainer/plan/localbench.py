"""``knet plan bench``: the device benchmark (``agent.blockbench``) run here on a zoo model.

The model is exported for the profile exactly as for a device, loaded into a
``BlockRunner`` with that profile, and measured on real inputs of the model's dataset. The
record says which machine measured it: figures for a profile taken on another machine
must be scaled in ``network.toml`` (``time_scale``).
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

from agent.blockbench import DEFAULT_CODECS, BenchRecord, measure


def bench_model(model: str, profile: str, *, role: str = "student", seed: int = 0,
                samples: int = 32, warmup: int = 5, repeats: int = 30,
                codecs: tuple[str, ...] = DEFAULT_CODECS, device: str | None = None
                ) -> BenchRecord:
    from agent.profiles import load_profile
    from agent.runtime import BlockRunner
    from cloud_trainer.export import export_for_profile
    from cloud_trainer.train import model_inputs

    prof = load_profile(profile)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_for_profile(model, profile, Path(tmp), seed=seed, role=role)
        runner = BlockRunner(manifest, Path(tmp), prof)
        x = model_inputs(model, samples, seed=seed)
        return measure(runner, x, device=device or _local_name(), codecs=codecs,
                       warmup=warmup, repeats=repeats, spool_dir=Path(tmp))


def _local_name() -> str:
    import re

    name = re.sub(r"[^a-z0-9-]", "-", platform.node().lower()).strip("-")
    return name[:63] or "local"
