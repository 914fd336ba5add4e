"""Model references: a zoo name, or an import path ``package.module:factory``.

The one place where ``--model``, ``trainer.toml``'s ``[models.X]`` and the planner turn a
reference into models. A factory is called without arguments and may return

- a :class:`ModelPair`, or a ``(teacher, student)`` tuple of :class:`BlockModel` (checked:
  same boundary shapes);
- a :class:`BlockModel` (a teacher alone, already in blocks);
- any other ``nn.Module`` (a teacher alone, cut automatically at traced candidates,
  ``cloud_trainer.models.cuts``; its input shape comes from an ``input_shape`` attribute or must
  be given).

A teacher alone is deployed as its own student (a copy, same blocks): devices then run the
real model and the cloud can finish any split; label-free retraining has nothing to gain
until a smaller student is given, so the gate keeps version 1. Weights (optional) are a
``torch.save`` state dict: ``{"teacher": ..., "student": ...}`` (either may be left out)
for a pair, the module's own state dict (or ``{"teacher": ...}``) for a teacher alone. A
factory's weights are version 1 as deployed: no training on labels happens for it.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloud_trainer.models.blocks import BlockModel, BlockModelError, ModelPair, Shape
from cloud_trainer.models.modelref import DEFAULT_CUTS, ModelRef, ModelRefError, parse_shape

__all__ = ["DEFAULT_CUTS", "Loaded", "ModelRef", "ModelRefError", "cut_module", "load_ref",
           "parse_shape", "resolve_pair"]


@dataclass
class Loaded:
    """What a reference gave: a pair, or a teacher alone (in blocks, or one module)."""

    ref: ModelRef
    pair: ModelPair | None = None
    teacher: BlockModel | None = None
    whole: nn.Module | None = None
    input_shape: Shape | None = None

    @property
    def model_id(self) -> str:
        """The pair's own id when it is manifest-safe, else the reference's."""
        if self.pair is not None and re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}",
                                                  self.pair.model_id):
            return self.pair.model_id
        return self.ref.model_id

    def network(self, role: str = "teacher") -> tuple[nn.Module, Shape]:
        """The model of ``role`` as one module (for tracing), with its input shape."""
        if self.pair is not None:
            m = self.pair.teacher if role == "teacher" else self.pair.student
            return m, m.input_shape
        if self.teacher is not None:
            return self.teacher, self.teacher.input_shape
        assert self.whole is not None and self.input_shape is not None
        return self.whole, self.input_shape

    def as_pair(self, cuts: str | Sequence[str] = DEFAULT_CUTS) -> ModelPair:
        """A pair; a teacher alone becomes its own student (a copy), a plain module is cut."""
        if self.pair is not None:
            return self.pair
        teacher = self.teacher
        if teacher is None:
            teacher = cut_module(*self.network(), cuts)
        return ModelPair(self.model_id, teacher, copy.deepcopy(teacher),
                         description=f"{self.ref.text}: teacher alone, deployed as its "
                                     "own student")


def cut_module(model: nn.Module, input_shape: Sequence[int],
               cuts: str | Sequence[str] = DEFAULT_CUTS) -> BlockModel:
    """``model`` cut at the traced candidates ``cuts`` selects (``cuts.select_cuts``)."""
    from cloud_trainer.models.cuts import analyse, block_model_from_cuts, select_cuts

    analysis = analyse(model, input_shape)
    return block_model_from_cuts(model, select_cuts(analysis, cuts), input_shape, analysis)


def _import(ref: ModelRef) -> Any:
    try:
        mod = importlib.import_module(str(ref.module))
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ModelRefError(f"{ref.text}: cannot import {ref.module}: "
                            f"{type(exc).__name__}: {exc}") from None
    obj: Any = mod
    for part in str(ref.attr).split("."):
        if not hasattr(obj, part):
            raise ModelRefError(f"{ref.text}: module {ref.module} has no attribute "
                                f"{ref.attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelRefError(f"{ref.text}: {ref.attr} is not callable (a factory function)")
    return obj


def _load_state(model: nn.Module, state: Any, path: Path, what: str) -> None:
    if not isinstance(state, dict):
        raise ModelRefError(f"weights {path}: {what}: not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelRefError(f"weights {path}: {what} does not fit the model: "
                            f"{' '.join(first)[:400]}") from None


def load_ref(ref: ModelRef | str, *, seed: int = 0, weights: Path | str | None = None,
             input_shape: Sequence[int] | str | None = None, trained: bool = True,
             role: str | None = None) -> Loaded:
    """Resolve ``ref``: a zoo pair (trained and cached when ``trained``) or a factory's
    result with ``weights`` loaded. Every failure is a :class:`ModelRefError`.

    ``role="teacher"``: only the teacher will be used, so a zoo entry whose teacher comes
    pretrained is not trained (its student's distillation takes minutes).
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    shape = parse_shape(input_shape)  # type: ignore[arg-type]
    if ref.zoo is not None:
        if weights is not None:
            raise ModelRefError(f"{ref.text}: weights are for import-path models; zoo weights "
                                "come from training (cloud_trainer.training.train)")
        from cloud_trainer.models.zoo import get_pair, zoo_entry

        if trained and not (role == "teacher" and zoo_entry(ref.zoo).pretrained):
            from cloud_trainer.training.train import trained_pair

            pair = trained_pair(ref.zoo, seed=seed)
        else:  # untrained, or only a teacher that comes pretrained: no training needed
            pair = get_pair(ref.zoo, seed=seed)
        return Loaded(ref, pair=pair, input_shape=pair.teacher.input_shape)
    factory = _import(ref)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = factory()
    except BlockModelError as exc:
        raise ModelRefError(f"{ref.text}: the factory built blocks that do not match: {exc}"
                            ) from None
    except Exception as exc:  # a user's factory may raise anything: said as a ModelRefError
        raise ModelRefError(f"{ref.text}: the factory raised {type(exc).__name__}: {exc}"
                            ) from None
    loaded = _wrap(ref, out, shape)
    if weights is not None:
        _apply_weights(loaded, Path(weights))
    if loaded.pair is not None:
        loaded.pair.eval()
    elif loaded.teacher is not None:
        loaded.teacher.eval()
    elif loaded.whole is not None:
        loaded.whole.eval()
    return loaded


def _wrap(ref: ModelRef, out: Any, shape: Shape | None) -> Loaded:
    if isinstance(out, tuple) and len(out) == 2 and all(isinstance(m, BlockModel) for m in out):
        try:
            out = ModelPair(ref.model_id, out[0], out[1])
        except BlockModelError as exc:
            raise ModelRefError(f"{ref.text}: teacher and student do not match: {exc}") from None
    if isinstance(out, ModelPair):
        _same_shape(ref, out.teacher.input_shape, shape)
        return Loaded(ref, pair=out, input_shape=out.teacher.input_shape)
    if isinstance(out, BlockModel):
        _same_shape(ref, out.input_shape, shape)
        return Loaded(ref, teacher=out, input_shape=out.input_shape)
    if isinstance(out, nn.Module):
        declared = getattr(out, "input_shape", None)
        if declared is not None:
            declared = parse_shape(declared)
            _same_shape(ref, declared, shape)
        shape = shape or declared
        if shape is None:
            raise ModelRefError(f"{ref.text}: cannot tell the input shape of the "
                                f"{type(out).__name__} it returns; give the input shape "
                                "(--input-shape C,H,W, or input_shape in trainer.toml)")
        return Loaded(ref, whole=out, input_shape=shape)
    raise ModelRefError(f"{ref.text}: the factory returned {type(out).__name__}; expected a "
                        "ModelPair, a (teacher, student) tuple of BlockModel, a BlockModel "
                        "or an nn.Module")


def _same_shape(ref: ModelRef, actual: Shape, given: Shape | None) -> None:
    if given is not None and tuple(actual) != tuple(given):
        raise ModelRefError(f"{ref.text}: input shape {tuple(given)} given, but the model's "
                            f"is {tuple(actual)}")


def _apply_weights(loaded: Loaded, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelRefError(f"weights {path}: no such file") from None
    except Exception as exc:  # pickle/zip errors, a file that is not torch.save output
        raise ModelRefError(f"weights {path}: cannot read it as a torch state dict: "
                            f"{type(exc).__name__}: {exc}") from None
    if loaded.pair is not None:
        parts = {k: v for k, v in state.items() if k in ("teacher", "student")} \
            if isinstance(state, dict) else {}
        if not parts:
            raise ModelRefError(f"weights {path}: a pair's weights are a dict with 'teacher' "
                                "and/or 'student' state dicts")
        for role, sd in parts.items():
            _load_state(getattr(loaded.pair, role), sd, path, role)
        return
    target = loaded.teacher if loaded.teacher is not None else loaded.whole
    assert target is not None
    if isinstance(state, dict) and "teacher" in state and isinstance(state["teacher"], dict):
        state = state["teacher"]
    _load_state(target, state, path, "teacher")


def resolve_pair(ref: ModelRef | str, seed: int = 0, weights: Path | str | None = None, *,
                 input_shape: Sequence[int] | str | None = None,
                 cuts: str | Sequence[str] = DEFAULT_CUTS) -> ModelPair:
    """The teacher/student pair ``ref`` stands for (see the module doc)."""
    return load_ref(ref, seed=seed, weights=weights, input_shape=input_shape).as_pair(cuts)
