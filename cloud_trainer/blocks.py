"""Block models: a DNN as an ordered chain of blocks with fixed boundary shapes.

Boundary 0 is the input; block ``i`` maps boundary ``i-1`` to boundary ``i``. Teacher and
student of a pair have the same boundary shapes, so their blocks are interchangeable
(KnowledgeNet): a device can run student blocks 1..k and the cloud finish with teacher
blocks k+1..N, and every student block can be supervised by the matching teacher block.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Shape = tuple[int, ...]


class BlockModelError(ValueError):
    """A chain whose blocks do not fit together, or a pair whose boundaries differ."""


class BlockModel(nn.Module):
    """An ordered chain of ``nn.Module`` blocks with boundary shapes found by a dry run.

    Shapes exclude the batch dimension. Blocks are numbered from 1, as in manifests.
    """

    def __init__(self, blocks: Sequence[nn.Module], input_shape: Sequence[int]) -> None:
        super().__init__()
        if not blocks:
            raise BlockModelError("a block model needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.input_shape: Shape = tuple(int(d) for d in input_shape)
        self.boundary_shapes: tuple[Shape, ...] = self._dry_run()

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, cuts: Sequence[int],
                        input_shape: Sequence[int]) -> BlockModel:
        """Cut an existing ``nn.Sequential`` after the layers at positions ``cuts``.

        ``cuts=[3, 6]`` makes blocks ``seq[0:3]``, ``seq[3:6]`` and ``seq[6:]``. The layers are
        shared with ``seq``, not copied.
        """
        points = [0, *cuts, len(seq)]
        if sorted(set(points)) != points or points[-2] >= len(seq):
            raise BlockModelError(f"cuts {list(cuts)} must be increasing positions inside "
                                  f"the {len(seq)} layers")
        return cls([seq[a:b] for a, b in itertools.pairwise(points)], input_shape)

    def _dry_run(self) -> tuple[Shape, ...]:
        was_training = self.training
        self.eval()  # batch norm in training mode would also update its statistics
        shapes = [self.input_shape]
        x = torch.zeros(2, *self.input_shape)
        try:
            with torch.no_grad():
                for i, block in enumerate(self.blocks, start=1):
                    x = block(x)
                    if not isinstance(x, torch.Tensor):
                        raise BlockModelError(f"block {i} returned {type(x).__name__}, "
                                              "not one tensor")
                    shapes.append(tuple(x.shape[1:]))
        except RuntimeError as exc:
            raise BlockModelError(f"block {i} does not accept boundary {i - 1} of shape "
                                  f"{shapes[-1]}: {exc}") from None
        finally:
            self.train(was_training)
        return tuple(shapes)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        return int(self.boundary_shapes[-1][0])

    def block(self, index: int) -> nn.Module:
        if not 1 <= index <= self.num_blocks:
            raise IndexError(f"block {index} out of 1..{self.num_blocks}")
        return self.blocks[index - 1]

    def params(self, index: int | None = None) -> int:
        mods = [self] if index is None else [self.block(index)]
        return sum(p.numel() for m in mods for p in m.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, 1, self.num_blocks)

    def run(self, x: torch.Tensor, first: int = 1, last: int | None = None) -> torch.Tensor:
        """Blocks ``first..last`` (inclusive); ``x`` is boundary ``first-1``."""
        last = self.num_blocks if last is None else last
        for i in range(first, last + 1):
            x = self.block(i)(x)
        return x

    def boundaries(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations at boundaries 0..N."""
        out = [x]
        for block in self.blocks:
            out.append(block(out[-1]))
        return out


@dataclass
class ModelPair:
    """A cloud teacher and an edge student with identical boundary shapes."""

    model_id: str
    teacher: BlockModel
    student: BlockModel

    def __post_init__(self) -> None:
        t, s = self.teacher.boundary_shapes, self.student.boundary_shapes
        if t != s:
            raise BlockModelError(f"teacher and student boundaries differ: {t} vs {s}")

    @property
    def num_blocks(self) -> int:
        return self.student.num_blocks

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    @property
    def size_reduction(self) -> float:
        """Fraction of the teacher's parameters the student does without."""
        return 1.0 - self.student.params() / self.teacher.params()
