"""SGD over parameters re-homed into one flat buffer: a step is one to three tensor operations.

``torch.optim.SGD`` spends tens of microseconds per step in Python (parameter groups, state
look-ups, one call per tensor), as much as a whole forward and backward pass of a small
table model. Here every parameter is a view of one flat tensor and every gradient a view of
another, so weight decay, momentum and the update each touch one tensor. The arithmetic is
torch's SGD without dampening or Nesterov: ``d = g + wd·w``; ``v = d`` on the first step,
then ``v = m·v + d``; ``w -= lr·v``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class FlatSGD:
    """Plain SGD with momentum and weight decay over ``params``, which it re-homes.

    While it is open, each parameter's data and ``.grad`` are views of ``flat`` and ``grad``;
    autograd accumulates into the gradient views, so call ``zero_grad`` before each backward
    pass. ``close`` gives every parameter its own storage back and drops the gradients.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.grad = torch.zeros_like(self.flat)
        self.velocity: torch.Tensor | None = None
        offset = 0
        for param in self.params:
            size = param.numel()
            param.data = self.flat[offset : offset + size].view_as(param)
            param.grad = self.grad[offset : offset + size].view_as(param)
            offset += size

    def zero_grad(self) -> None:
        self.grad.zero_()

    @torch.no_grad()
    def step(self, *, scale: float = 1.0) -> None:
        """One update with the gradient ``scale · grad`` (DP-SGD's 1 / expected batch size)."""
        if self.weight_decay == 0 and self.momentum == 0:
            self.flat.add_(self.grad, alpha=-self.lr * scale)
            return
        if self.weight_decay != 0:
            direction = self.flat.mul(self.weight_decay).add_(self.grad, alpha=scale)
        else:
            direction = self.grad.mul(scale)  # a new tensor: the velocity may keep it
        if self.momentum != 0:
            if self.velocity is None:
                self.velocity = direction
            else:
                self.velocity.mul_(self.momentum).add_(direction)
            direction = self.velocity
        self.flat.add_(direction, alpha=-self.lr)

    def close(self) -> None:
        for param in self.params:
            param.data = param.data.clone()
            param.grad = None
