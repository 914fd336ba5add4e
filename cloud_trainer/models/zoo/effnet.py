"""``effnet-lite0``: the pretrained EfficientNet-Lite0 teacher and a student derived from it.

Resolution: 96×96. On the 2-core VM the teacher costs ~9 ms per frame at 96 px against
~26 ms at 128 and ~140 ms at 224 (torch, one thread), and it still names the scenes (cat
0.97 on ``chelsea``, rocket 1.00, motorcycle 0.98); docs/models.md has the figures.

Blocks (cut at stage boundaries, every cut a single tensor, none inside a residual):

====  ==========================================  ===================
block teacher                                      boundary out (96 px)
====  ==========================================  ===================
1     input scaling, stem, stages 1-2 (3 MBConv)   24×24×24
2     stage 3 (2 MBConv, k5)                       40×12×12
3     stages 4-5 (6 MBConv)                        112×6×6
4     stages 6-7 (5 MBConv)                        320×3×3
5     head: 1×1 conv to 1280, pool, classifier    1000 logits
====  ==========================================  ===================

Boundary 0 is the camera's RGB in [0, 1]: the scaling the checkpoint expects is the first
layer of block 1, so devices feed pixels and drifts act on pixels.

The student keeps every boundary, and blocks 1-2 whole (stages 1-3: 55 k parameters, all
the high-resolution detail). It is smaller where the parameters are: stage 5 keeps two of
its three MBConvs (the second expanded 3× instead of 6×), stages 6-7 one MBConv each at 3×,
and the head is 640 channels wide instead of 1280: 1.71 M parameters against 4.65 M (63 %
fewer). *Derived* (the default) copies the teacher's weights into it — the dropped repeats
are residual, so leaving them out starts close to the teacher, and where a layer is narrower
it keeps the channels that matter most (|batch-norm scale| × the norm of the weights that
read the channel). *Scratch* is the same architecture freshly initialised;
``knet bench distill --model effnet-lite0`` compares both.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import nn

from cloud_trainer.models.blocks import BlockModel, ModelPair
from cloud_trainer.models.zoo.efficientnet_lite import (
    LITE0_STAGES,
    MEAN,
    NUM_CLASSES,
    STD,
    STEM,
    EfficientNetLite,
    Head,
    MBConv,
    Stage,
    Stem,
    pretrained_lite0,
    stage_blocks,
)

IMAGE_SIZE = 96
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
# Teacher MBConv indices ending each block (the checkpoint's _blocks.N), stage boundaries.
BLOCK_ENDS = (3, 5, 11, 16)
# The expansion of every MBConv the student keeps, per stage; the teacher has (1,), (6, 6),
# (6, 6), (6, 6, 6), (6, 6, 6), (6, 6, 6, 6), (6,). Stages 1-4 hold 5 % of the parameters
# and all of the high-resolution detail: kept whole. The parameters sit in stages 5-7 and
# the head, so that is where the student is smaller.
STUDENT_PLAN: tuple[tuple[int, ...], ...] = ((1,), (6, 6), (6, 6), (6, 6, 6), (6, 3), (3,), (3,))
STUDENT_HEAD = 640
Init = Literal["derived", "scratch"]


class Scale(nn.Module):
    """``(x − mean) / std``: the checkpoint's input scaling, as a layer of block 1."""

    def __init__(self, mean: float = MEAN, std: float = STD) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _blocks_of(stem: nn.Module, mbconvs: list[nn.Module], head: nn.Module,
               ends: tuple[int, ...]) -> list[nn.Module]:
    cuts = [0, *ends]
    parts = [list(mbconvs[a:b]) for a, b in itertools.pairwise(cuts)]
    return [nn.Sequential(Scale(), stem, *parts[0]), *(nn.Sequential(*p) for p in parts[1:]),
            head]


def _student_stages() -> tuple[Stage, ...]:
    return tuple(Stage(len(plan), s.kernel, s.stride, s.expand, s.out)
                 for s, plan in zip(LITE0_STAGES, STUDENT_PLAN, strict=True))


def _kept() -> list[int]:
    """Teacher MBConv index of each student MBConv (the first ones of every stage)."""
    return [start + j for start, plan in zip(_teacher_stage_starts(), STUDENT_PLAN, strict=True)
            for j in range(len(plan))]


def _teacher_stage_starts() -> list[int]:
    """Index of each stage's first MBConv among the teacher's blocks."""
    starts, k = [], 0
    for s in LITE0_STAGES:
        starts.append(k)
        k += s.repeats
    return starts


def teacher(net: EfficientNetLite | None = None) -> BlockModel:
    """The pretrained network cut into the five blocks above (modules shared with ``net``)."""
    net = net or pretrained_lite0(IMAGE_SIZE)
    stem = Stem(IMAGE_SIZE)
    stem._conv_stem, stem._bn0 = net._conv_stem, net._bn0
    head = Head(LITE0_STAGES[-1].out, size=math.ceil(IMAGE_SIZE / 32))
    head._conv_head, head._bn1, head._fc = net._conv_head, net._bn1, net._fc
    head._dropout = net._dropout
    return BlockModel(_blocks_of(stem, list(net._blocks), head, BLOCK_ENDS),
                      INPUT_SHAPE).eval()


def student_skeleton() -> BlockModel:
    """The student's architecture, freshly initialised (torch's default init)."""
    stages = _student_stages()
    cin, widths = STEM, []
    for st, plan in zip(stages, STUDENT_PLAN, strict=True):
        for e in plan:
            widths.append(cin * e)
            cin = st.out
    built = list(stage_blocks(stages, STEM, math.ceil(IMAGE_SIZE / 2), widths))
    mbconvs = [b for b, _ in built]
    ends = tuple(_student_index(e) for e in BLOCK_ENDS)
    head = Head(stages[-1].out, STUDENT_HEAD, NUM_CLASSES, size=built[-1][1])
    return BlockModel(_blocks_of(Stem(IMAGE_SIZE), mbconvs, head, ends), INPUT_SHAPE)


def _student_index(teacher_end: int) -> int:
    """How many student MBConvs come before the teacher's MBConv ``teacher_end``."""
    return sum(1 for t in _kept() if t < teacher_end)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in channel order (keeps the layout stable)."""
    return torch.sort(torch.topk(score, k).indices).values


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, idx: torch.Tensor | None) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(src, name).detach()
        getattr(dst, name).data.copy_(value if idx is None else value[idx])


def _derive_mbconv(dst: MBConv, src: MBConv) -> None:
    """Copy ``src`` into the (possibly narrower) ``dst``, keeping the strongest channels."""
    hidden = dst._depthwise_conv.out_channels
    score = src._bn1.weight.detach().abs() * src._project_conv.weight.detach().flatten(1).norm(
        dim=0)
    idx = _top(score, hidden)
    if src.has_expand:
        dst._expand_conv.weight.data.copy_(src._expand_conv.weight.detach()[idx])
        _copy_bn(dst._bn0, src._bn0, idx)
    dst._depthwise_conv.weight.data.copy_(src._depthwise_conv.weight.detach()[idx])
    _copy_bn(dst._bn1, src._bn1, idx)
    dst._project_conv.weight.data.copy_(src._project_conv.weight.detach()[:, idx])
    _copy_bn(dst._bn2, src._bn2, None)


def _derive_head(dst: Head, src: Head) -> None:
    score = src._bn1.weight.detach().abs() * src._fc.weight.detach().norm(dim=0)
    idx = _top(score, dst._conv_head.out_channels)
    dst._conv_head.weight.data.copy_(src._conv_head.weight.detach()[idx])
    _copy_bn(dst._bn1, src._bn1, idx)
    dst._fc.weight.data.copy_(src._fc.weight.detach()[:, idx])
    dst._fc.bias.data.copy_(src._fc.bias.detach())


def _mbconvs(model: BlockModel) -> list[MBConv]:
    return [m for m in model.modules() if isinstance(m, MBConv)]


@torch.no_grad()
def derive_student(t: BlockModel) -> BlockModel:
    """The student initialised from teacher ``t`` (module doc): the first MBConvs of every
    stage, strongest channels where narrower, stem copied whole."""
    s = student_skeleton()
    t_stem, s_stem = (next(m for m in model.modules() if isinstance(m, Stem)) for model in (t, s))
    s_stem.load_state_dict(t_stem.state_dict())
    t_conv = _mbconvs(t)
    for dst, k in zip(_mbconvs(s), _kept(), strict=True):
        _derive_mbconv(dst, t_conv[k])
    _derive_head(s.block(s.num_blocks), t.block(t.num_blocks))
    return s.eval()


def build_pair(init: Init = "derived") -> ModelPair:
    """Both models keep their weights channels-last: torch's CPU kernels for depthwise
    convolutions then train the student ~40 % faster (1.0 vs 1.7 s per batch of 64 at
    96 px, one thread); outputs, state dicts and ONNX exports are unchanged."""
    t = teacher()
    s = derive_student(t) if init == "derived" else student_skeleton().eval()
    t, s = (m.to(memory_format=torch.channels_last) for m in (t, s))
    return ModelPair("effnet-lite0", t, s, num_classes=NUM_CLASSES,
                     description="EfficientNet-Lite0 (ImageNet) at 96 px, 5 blocks at stage "
                                 "boundaries; student derived from the teacher, 63 % smaller")


