"""``vision``: a MobileNet-style chain for 3×96×96 frames, five blocks.

Boundaries: (3,96,96) → (16,48,48) → (32,24,24) → (64,12,12) → (128,6,6) → (8,) logits.
Block 1 is a stride-2 stem; blocks 2-4 are stages that each halve the resolution with a
depthwise-separable unit (MobileNetV1) and, in the teacher, refine with inverted-residual
units (MobileNetV2: expand 1×1 → depthwise 3×3 → project 1×1, with a skip). The student
keeps the downsampling units and the boundaries, drops most refinement, so both run the
same operators on a device.

Costs are set for CPU training on two cores: every layer that widens channels works at
the stage's *output* resolution (downsample first, then widen), because an expansion at
48×48 made one stage cost more than the rest of the teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from cloud_trainer.models.blocks import BlockModel, ModelPair
from cloud_trainer.models.data import VISION_CLASSES, VISION_SIZE

INPUT_SHAPE = (3, VISION_SIZE, VISION_SIZE)
STEM = 16
STAGES = (32, 64, 128)


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU()]


class InvertedResidual(nn.Module):
    """Expand 1×1 → depthwise 3×3 → project 1×1, plus the input (MobileNetV2)."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        mid = channels * expand
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False), *_bn_relu(mid),
            nn.Conv2d(mid, mid, 3, 1, 1, groups=mid, bias=False), *_bn_relu(mid),
            nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """Depthwise 3×3 (with the stride), then pointwise to ``cout`` (MobileNetV1)."""
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), *_bn_relu(cin),
            nn.Conv2d(cin, cout, 1, bias=False), *_bn_relu(cout)]


def _stage(cin: int, cout: int, units: int, expand: int) -> nn.Sequential:
    """Downsample + widen, then ``units`` refinements (expand 1: a separable unit)."""
    refine: list[nn.Module] = []
    for _ in range(units):
        refine += [InvertedResidual(cout, expand)] if expand > 1 else _separable(cout, cout, 1)
    return nn.Sequential(*_separable(cin, cout, 2), *refine)


def _head() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                         nn.Linear(STAGES[-1], VISION_CLASSES))


def teacher() -> BlockModel:
    c1, c2, c3 = STAGES
    return BlockModel([
        nn.Sequential(nn.Conv2d(3, STEM, 3, 2, 1, bias=False), *_bn_relu(STEM),
                      nn.Conv2d(STEM, STEM, 3, 1, 1, groups=STEM, bias=False),
                      *_bn_relu(STEM)),
        _stage(STEM, c1, units=1, expand=1),
        _stage(c1, c2, units=1, expand=3),
        _stage(c2, c3, units=2, expand=3),
        _head(),
    ], INPUT_SHAPE)


def student() -> BlockModel:
    c1, c2, c3 = STAGES
    return BlockModel([
        nn.Sequential(nn.Conv2d(3, STEM, 3, 2, 1, bias=False), *_bn_relu(STEM)),
        _stage(STEM, c1, units=0, expand=1),
        _stage(c1, c2, units=0, expand=1),
        _stage(c2, c3, units=1, expand=1),
        _head(),
    ], INPUT_SHAPE)


def build_pair() -> ModelPair:
    return ModelPair("vision", teacher(), student(), num_classes=VISION_CLASSES,
                     description="3×96×96 frames, 5 blocks: stem, 3 MobileNet-style stages, "
                                 "head")
