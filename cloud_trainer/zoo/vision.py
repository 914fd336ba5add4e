"""``vision``: a MobileNet-style chain for 3×96×96 frames, five blocks.

Boundaries: (3,96,96) → (24,48,48) → (40,24,24) → (80,12,12) → (160,6,6) → (8,) logits.
Each stage is made of inverted-residual units (expand 1×1 → depthwise 3×3 → project 1×1);
the teacher uses expansion 4 and two units per stage, the student expansion 2 and one unit,
so both have the same boundaries and run the same operators on a device.
"""

from __future__ import annotations

from torch import nn

from cloud_trainer.blocks import BlockModel, ModelPair
from cloud_trainer.data import VISION_CLASSES, VISION_SIZE

INPUT_SHAPE = (3, VISION_SIZE, VISION_SIZE)
STAGES = (24, 40, 80, 160)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU()

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.body(x)
        return self.act(x + y if self.residual else y)


def _stage(cin: int, cout: int, units: int, expand: int) -> nn.Sequential:
    layers = [InvertedResidual(cin, cout, 2, expand)]
    layers += [InvertedResidual(cout, cout, 1, expand) for _ in range(units - 1)]
    return nn.Sequential(*layers)


def _chain(stem: int, units: int, expand: int) -> BlockModel:
    c1, c2, c3, c4 = STAGES
    return BlockModel([
        nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                      nn.Conv2d(stem, c1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU()),
        _stage(c1, c2, units, expand),
        _stage(c2, c3, units, expand),
        _stage(c3, c4, units, expand),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                      nn.Linear(c4, VISION_CLASSES)),
    ], INPUT_SHAPE)


def teacher() -> BlockModel:
    return _chain(stem=32, units=2, expand=4)


def student() -> BlockModel:
    return _chain(stem=16, units=1, expand=2)


def build_pair() -> ModelPair:
    return ModelPair("vision", teacher(), student(), num_classes=VISION_CLASSES,
                     description="3×96×96 frames, 5 blocks: stem, 3 inverted-residual "
                                 "stages, head")
