"""Elementwise maps from ``[0, 1)`` data to an unbounded space, with exact logdets:
the logit transform (RealNVP, Residual Flows) and per-channel normalization (the
hybrid models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resflow.layers.base import FlowLayer


def _sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


class LogitTransform(FlowLayer):
    """``z = logit(alpha + (1 - 2 alpha) y)`` for ``y in [0, 1]``.

    logdet per sample: ``sum[log(1 - 2 alpha) - log(s) - log(1 - s)]`` with
    ``s = alpha + (1 - 2 alpha) y``. Residual Flows: alpha = 1e-5 (MNIST; official
    code 1e-6), 0.05 (CIFAR-10).
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 < alpha < 0.5:
            # alpha = 0: y = 0 (a dequantized 0 with noise 0) has logit -inf
            raise ValueError(
                f"logit_alpha (the logit transform's alpha) must be in (0, 0.5), got "
                f"{alpha}: 0 maps the data's edge y = 0 to -inf (Residual Flows use 1e-6 "
                "to 0.05)"
            )
        self.alpha = alpha

    def forward(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * y
        z = torch.log(s) - torch.log1p(-s)
        logdet = _sum(F.softplus(-z) + F.softplus(z)) + y[0].numel() * torch.log(
            torch.tensor(1 - 2 * self.alpha, dtype=y.dtype)
        )
        return z, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)


class Normalize(FlowLayer):
    """``z = (y - mean) / std`` per channel (the hybrid models' replacement for logit)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = -torch.log(self.std).sum() * y[0, 0].numel()
        return (y - self.mean) / self.std, logdet.expand(y.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return z * self.std + self.mean
