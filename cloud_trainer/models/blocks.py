"""Block models: a DNN as an ordered chain of blocks with fixed boundary shapes.

Boundary 0 is the input; block ``i`` maps boundary ``i-1`` to boundary ``i``. Teacher and
student of a pair have the same boundary shapes, so their blocks are interchangeable
(KnowledgeNet): a device can run student blocks 1..k and the cloud finish with teacher
blocks k+1..N, and every student block can be supervised by the matching teacher block.
Where a student is narrower inside, any channel adapter (e.g. a 1×1 conv back to the
boundary's width) belongs *inside* the student block, so the boundary stays the contract.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cloud_trainer.errors import KnetTrainerError

Shape = tuple[int, ...]


class BlockModelError(KnetTrainerError, ValueError):
    """A chain whose blocks do not fit together, or a pair whose boundaries differ."""


class BlockModel(nn.Module):
    """An ordered chain of ``nn.Module`` blocks with boundary shapes found by a dry run.

    Shapes exclude the batch dimension. Blocks are numbered from 1, as in manifests.
    ``shapes``, when given, declares every boundary (0..N) and the dry run must agree.
    ``eval()``/``train()`` reach every block (they are children of an ``nn.ModuleList``).
    """

    def __init__(self, blocks: Sequence[nn.Module], input_shape: Sequence[int],
                 shapes: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        if not blocks:
            raise BlockModelError("a block model needs at least one block")
        bad = [i for i, b in enumerate(blocks, start=1) if not isinstance(b, nn.Module)]
        if bad:
            raise BlockModelError(f"block(s) {bad} are not nn.Module instances")
        self.blocks = nn.ModuleList(blocks)
        self.input_shape: Shape = tuple(int(d) for d in input_shape)
        self.boundary_shapes: tuple[Shape, ...] = self.check()
        if shapes is not None:
            declared = tuple(tuple(int(d) for d in s) for s in shapes)
            if declared != self.boundary_shapes:
                raise BlockModelError(f"declared boundaries {declared} != dry run "
                                      f"{self.boundary_shapes}")

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, cuts: Sequence[int],
                        input_shape: Sequence[int]) -> BlockModel:
        """Cut an existing ``nn.Sequential`` before the layers at positions ``cuts``.

        ``cuts=[3, 6]`` makes blocks ``seq[0:3]``, ``seq[3:6]`` and ``seq[6:]``. The layers are
        shared with ``seq``, not copied. A slice of an ``nn.Sequential`` is a new container
        in training mode, so the result is put in ``seq``'s mode explicitly.
        """
        points = [0, *(int(c) for c in cuts), len(seq)]
        if any(b <= a for a, b in itertools.pairwise(points)):
            raise BlockModelError(f"cuts {list(cuts)} must be increasing positions inside "
                                  f"the {len(seq)} layers (1..{len(seq) - 1})")
        model = cls([seq[a:b] for a, b in itertools.pairwise(points)], input_shape)
        return model.train(seq.training)

    def check(self) -> tuple[Shape, ...]:
        """Dry-run a batch of 2 zeros; return the boundary shapes or name the bad block."""
        was_training = self.training
        self.eval()  # batch norm in training mode would also update its statistics
        shapes = [self.input_shape]
        x = torch.zeros(2, *self.input_shape)
        i = 0
        try:
            with torch.no_grad():
                for i, block in enumerate(self.blocks, start=1):
                    x = block(x)
                    if not isinstance(x, torch.Tensor):
                        raise BlockModelError(f"block {i} returned {type(x).__name__}, "
                                              "not one tensor")
                    if x.dtype != torch.float32 or x.ndim < 2 or x.shape[0] != 2:
                        raise BlockModelError(f"block {i} must keep the batch dimension and "
                                              f"float32, got {x.dtype} {tuple(x.shape)}")
                    shapes.append(tuple(int(d) for d in x.shape[1:]))
        except (RuntimeError, ValueError, TypeError) as exc:
            if isinstance(exc, BlockModelError):
                raise
            raise BlockModelError(f"block {i} does not accept boundary {i - 1} of shape "
                                  f"{shapes[-1]}: {exc}") from None
        finally:
            self.train(was_training)
        return tuple(shapes)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int | None:
        """Width of the last boundary when it is a vector of logits, else ``None``."""
        last = self.boundary_shapes[-1]
        return int(last[0]) if len(last) == 1 else None

    def block(self, index: int) -> nn.Module:
        if not 1 <= index <= self.num_blocks:
            raise IndexError(f"block {index} out of 1..{self.num_blocks}")
        return self.blocks[index - 1]

    def params(self, index: int | None = None) -> int:
        """Parameter count of block ``index`` (1-based), or of the whole chain."""
        mods = [self] if index is None else [self.block(index)]
        return sum(p.numel() for m in mods for p in m.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, 1, self.num_blocks)

    def run(self, x: torch.Tensor, first: int = 1, last: int | None = None) -> torch.Tensor:
        """Blocks ``first..last`` (1-based, inclusive); ``x`` is boundary ``first-1``."""
        last = self.num_blocks if last is None else last
        if not 1 <= first <= last <= self.num_blocks:
            raise IndexError(f"blocks {first}..{last} not within 1..{self.num_blocks}")
        for i in range(first, last + 1):
            x = self.blocks[i - 1](x)
        return x

    def boundaries(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations at boundaries 0..N (``x`` itself first)."""
        out = [x]
        for block in self.blocks:
            out.append(block(out[-1]))
        return out


@dataclass
class ModelPair:
    """A cloud teacher and an edge student with identical boundary shapes (checked).

    ``metrics`` holds what training measured (accuracies, seconds); empty when untrained.
    """

    model_id: str
    teacher: BlockModel
    student: BlockModel
    num_classes: int | None = None
    description: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t, s = self.teacher.boundary_shapes, self.student.boundary_shapes
        if t != s:
            raise BlockModelError(f"teacher and student boundaries differ: {t} vs {s}")
        inferred = self.student.num_classes
        if self.num_classes is None:
            self.num_classes = inferred
        elif self.num_classes != inferred:
            raise BlockModelError(f"num_classes={self.num_classes} but the last boundary is "
                                  f"{s[-1]}")

    @property
    def num_blocks(self) -> int:
        return self.student.num_blocks

    @property
    def boundary_shapes(self) -> tuple[Shape, ...]:
        return self.student.boundary_shapes

    @property
    def size_reduction(self) -> float:
        """Fraction of the teacher's parameters the student does without."""
        return 1.0 - self.student.params() / self.teacher.params()

    def eval(self) -> ModelPair:
        self.teacher.eval()
        self.student.eval()
        return self
