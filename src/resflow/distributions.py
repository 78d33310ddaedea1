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


class DiagonalNormal(nn.Module):
    """``N(mu, diag(sigma^2))`` with learned ``mu`` and ``log sigma`` per element
    (i-ResNet's prior); ``sample`` scales the noise by ``temperature``."""

    def __init__(self, shape: tuple[int, ...] | int) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.mean = nn.Parameter(torch.zeros(self.shape))
        self.log_std = nn.Parameter(torch.zeros(self.shape))

    def log_prob(self, z: Tensor) -> Tensor:
        eps = (z - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * (eps.pow(2) + LOG_2PI) - self.log_std).flatten(1).sum(1)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        eps = torch.randn(n, *self.shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * eps * torch.exp(self.log_std)
