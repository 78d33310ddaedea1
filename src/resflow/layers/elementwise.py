"""Elementwise preprocessing flows for images, each with its exact log-determinant.

The image pipeline of Residual Flows (Chen et al. 2019, Appendix E) is
``uint8 -> Dequantize -> [RandomHorizontalFlip] -> LogitTransform(alpha)``. With these
as flow layers, ``log p(x)`` of the whole model includes every preprocessing term, so
bits/dim follows the standard convention (see :mod:`resflow.evaluation`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resflow.layers.base import FlowLayer, zero_logdet


def _sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


class Dequantize(FlowLayer):
    """Uniform dequantization of integer levels: ``y = (x + u) / levels``, ``u ~ U(0, 1)``.

    Input: integers ``0..levels-1`` (any dtype). Output in ``[0, 1)``. The logdet of the
    scaling, ``-D log(levels)``, is *not* included here: it is the ``D log 256`` term of
    the bits/dim convention, applied once in :func:`resflow.evaluation.bits_per_dim`.
    The noise is drawn in both train and eval mode (the paper evaluates with it).
    ``inverse`` quantizes back: ``floor(y * levels)`` clamped to the valid range.
    """

    def __init__(self, levels: int = 256) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.levels = levels

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xf = x.float() if not x.is_floating_point() else x
        if bool((xf < 0).any()) or bool((xf > self.levels - 1).any()):
            raise ValueError(
                f"Dequantize expects integer levels in [0, {self.levels - 1}], "
                f"got values in [{float(xf.min())}, {float(xf.max())}]"
            )
        return (xf + torch.rand_like(xf)) / self.levels, zero_logdet(xf)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.floor(y * self.levels).clamp(0, self.levels - 1)


class ReduceBits(FlowLayer):
    """Keep the ``n_bits`` most significant bits of 8-bit integers (e.g. 5-bit CelebA-HQ).

    ``x -> floor(x / 2^(8 - n_bits))``: a quantization, not a bijection; the result has
    ``2^n_bits`` levels and the bits/dim are those of the reduced data (as in Glow and
    Residual Flows). ``inverse`` maps a level to the centre of its 8-bit bin.
    """

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        if not 1 <= n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
        self.n_bits = n_bits

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        step = 2 ** (8 - self.n_bits)
        return torch.div(x, step, rounding_mode="floor"), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        step = 2 ** (8 - self.n_bits)
        return y * step + step // 2


class LogitTransform(FlowLayer):
    """``z = logit(alpha + (1 - 2 alpha) y)`` for ``y in [0, 1]``.

    logdet per sample: ``sum[log(1 - 2 alpha) - log(s) - log(1 - s)]`` with
    ``s = alpha + (1 - 2 alpha) y``. Residual Flows: alpha = 1e-5 (MNIST; official
    code 1e-6), 0.05 (CIFAR-10).
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
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


class RandomHorizontalFlip(FlowLayer):
    """Flip each image left-right with probability ``p`` in training mode only.

    A data augmentation with logdet 0 (a permutation); identity in eval mode and in
    ``inverse``.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and self.p > 0:
            flip = torch.rand(x.shape[0], device=x.device) < self.p
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return y
