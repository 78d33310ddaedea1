"""Base distributions of flows."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


class StandardNormal(nn.Module):
    """``N(0, I)`` over tensors of a fixed event ``shape``; ``log_prob`` sums all dims."""

    def __init__(self, shape: tuple[int, ...] | int) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.pow(2) + LOG_2PI).flatten(1).sum(1)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        a = self._anchor
        return temperature * torch.randn(n, *self.shape, device=a.device, dtype=a.dtype)
