"""Synthetic-gradient modules ("M blocks", Jaderberg et al. 2017, *Decoupled Neural Interfaces*).

An M block sits on a block boundary and predicts ∂L/∂h from the activation ``h`` (and, when
``conditioned``, the label: cDNI), so the block below can update as soon as it has produced
``h`` instead of waiting for the backward pass of every block above. It is trained to regress
the gradient that does come back from the block above, later.

Shapes follow the boundary: a small conv net on (C, H, W) boundaries (gradients of conv
features are spatially local, and a conv net shares weights over positions), a two-layer
MLP on vectors. The last layer starts at zero, so the first synthetic gradients are zero:
a block does not move on an untrained M block's noise (as in the paper). The label enters
as a learned per-class bias on the first hidden layer: the same function as concatenating
a one-hot label to the input (a constant input channel contributes a constant), at none of
the cost of convolving ten extra channels.

Inputs are divided by a running estimate of their RMS: a ReLU network's output grows with
its input, so an M block fed raw activations turns a block whose outputs grow (no batch
norm at its end) into larger synthetic gradients, which grow the outputs further — the
run diverges (measured: NaN within 200 steps with SGD on ``digits`` block 3).

Targets are scaled to unit RMS by a running estimate of their size. Gradients shrink by
orders of magnitude from the loss downwards (and start near zero where they are themselves
bootstrapped from an M block above), and an M block regressing tiny raw targets learns
nothing useful in a few hundred steps; the scale is multiplied back into the prediction.

An M block can also replay: after its step on a gradient that has just come back, it takes
``replay_steps`` more Adam steps on batches drawn from the last ``replay`` that came back.
One step per arriving gradient leaves it too slow to follow the blocks above (measured on
``digits``, M on boundary 2: 98.2 % in one process without replay, 98.8 % with 3 replayed
steps); the blocks above move little in a few steps, so a recent (activation, label,
gradient) triple is still nearly the right target. Neither more data per step (one step on
the last 4 batches together: 98.2 %) nor more steps on the newest batch alone (98.4 %) does
as well. It stays DNI: the block below still updates with the M block's prediction only.
"""

from __future__ import annotations

import torch
from torch import nn

from cloud_trainer.models.blocks import Shape


class SyntheticGradient(nn.Module):
    """``M(h, y)·scale ≈ ∂L/∂h`` on a boundary of shape ``shape`` (batch dimension excluded).

    ``mean_square`` (a buffer, so it travels with the state dict) is the running mean of the
    targets' squares, ``scale`` its root; ``input_mean_square`` the same for the inputs.
    Conv boundaries get ``layers`` 3×3 convs, the hidden ones ``hidden`` channels wide
    (default: half the boundary's width); vectors a hidden layer of ``hidden`` units
    (default 256).
    """

    def __init__(self, shape: Shape, num_classes: int | None, conditioned: bool = True,
                 hidden: int | None = None, layers: int = 2) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        classes = num_classes if conditioned and num_classes else 0
        self.conv = len(self.shape) == 3
        if self.conv:
            c = self.shape[0]
            width = hidden or max(8, c // 2)  # cheap: it runs beside the block, every step
            convs = [nn.Conv2d(c if k == 0 else width, width, 3, padding=1)
                     for k in range(layers - 1)]
            last: nn.Conv2d | nn.Linear = nn.Conv2d(width if convs else c, c, 3, padding=1)
            self.first = convs[0] if convs else None
            rest: list[nn.Module] = []
            for conv in convs[1:]:
                rest += [nn.ReLU(), conv]
            self.tail = nn.Sequential(*rest, nn.ReLU(), last) if convs else nn.Sequential(last)
        else:
            d = 1
            for s in self.shape:
                d *= s
            width = hidden or 256
            self.first = nn.Linear(d, width)
            last = nn.Linear(width, d)
            self.tail = nn.Sequential(nn.ReLU(), last)
        self.label_bias = nn.Embedding(classes, width) if classes and self.first else None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        if self.label_bias is not None:
            nn.init.zeros_(self.label_bias.weight)
        self.register_buffer("mean_square", torch.zeros(()))
        self.register_buffer("input_mean_square", torch.zeros(()))

    @property
    def scale(self) -> float:
        ms = float(self.mean_square)
        return ms ** 0.5 if ms > 0 else 1.0

    def observe(self, h: torch.Tensor, momentum: float) -> None:
        """Track the input's size (a running mean of its squares)."""
        _running(self.input_mean_square, h.detach().square().mean(), momentum)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        ims = float(self.input_mean_square)
        z = h / ims ** 0.5 if ims > 0 else h
        if not self.conv:
            z = z.flatten(1)
        if self.first is not None:
            z = self.first(z)
            if self.label_bias is not None:
                if y is None:
                    raise ValueError("a label-conditioned M block needs the labels")
                bias = self.label_bias(y)
                z = z + (bias[:, :, None, None] if self.conv else bias)
        return self.tail(z).reshape(h.shape[0], *self.shape)


def _running(buf: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    buf.copy_(value if float(buf) == 0 else momentum * buf + (1 - momentum) * value)


class SyntheticGradientTrainer:
    """An M block with its optimiser: predict, and learn from a true gradient when it comes.

    Keeps the cosine similarity between prediction and target for every update (computed
    *before* the update, on a target the module has not seen: how good the gradients the
    block below trained on were), and ``trust``, their running mean clipped to [0, 1].
    """

    def __init__(self, module: SyntheticGradient, lr: float, momentum: float = 0.99,
                 replay: int = 0, replay_steps: int = 0, seed: int = 0) -> None:
        self.module = module
        self.replay, self.replay_steps = replay, replay_steps
        self.recent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.Adam(module.parameters(), lr=lr)
        self.cosines: list[float] = []
        self.updates = 0
        self.momentum = momentum
        self.trust = 0.0

    @torch.no_grad()
    def synthetic(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gradient the block below uses now: ∂L/∂h for the batch-mean loss."""
        self.module.observe(h, self.momentum)
        return self.module(h, y) * self.module.scale

    def learn(self, h: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> None:
        """One Adam step towards ``grad`` (∂L/∂h of the batch-mean loss, as it arrived), then
        ``replay_steps`` on recent ones (the current scale applied to their targets too)."""
        _running(self.module.mean_square, grad.square().mean(), self.momentum)
        target = grad / self.module.scale
        pred = self.module(h, y)
        with torch.no_grad():
            cos = float(nn.functional.cosine_similarity(pred.flatten(1), target.flatten(1),
                                                        dim=1).mean())
        self.cosines.append(cos)
        self.trust = 0.9 * self.trust + 0.1 * max(0.0, min(1.0, cos))
        self._fit(pred, target)
        if not self.replay:
            return
        self.recent.append((h, y, grad))
        del self.recent[: -self.replay]
        for _ in range(self.replay_steps):
            k = int(torch.randint(len(self.recent), (1,), generator=self.gen))
            h_k, y_k, grad_k = self.recent[k]
            self._fit(self.module(h_k, y_k), grad_k / self.module.scale)

    def _fit(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        loss = nn.functional.mse_loss(pred, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.updates += 1
