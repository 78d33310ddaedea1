"""Multi-scale plumbing: reshaping to vectors and factoring out half the channels.

Multi-scale models (RealNVP, Dinh et al. 2017; Residual Flows for images larger than
32x32) send half of the channels straight to the latent after a squeeze and keep
transforming the other half. Here a model's latent is a flat vector ``[B, D]``: a
:class:`FactorOut` layer flattens the factored half and concatenates it in front of
the (flat) output of the layers that continue on the other half.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer, zero_logdet


class Flatten(FlowLayer):
    """``[B, *shape] -> [B, prod(shape)]`` (logdet 0)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Flatten expects [B, {self.shape}], got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return y.reshape(y.shape[0], *self.shape)


class FactorOut(FlowLayer):
    """Factor out the first half of the channels; ``inner`` transforms the second half.

    Output: ``cat([prior(z1).flatten(1), inner(x2)], 1)`` where ``inner`` must return
    a flat ``[B, D2]``. The factored half's prior is a standard normal (as in Residual
    Flows) or, with ``learned_prior=True``, a learned diagonal Gaussian (i-ResNet),
    realised as the flow ``z1 -> (z1 - mu) * exp(-log_sigma)`` so the model's base stays
    ``N(0, I)``.
    """

    def __init__(
        self, inner: FlowLayer, shape: tuple[int, int, int], learned_prior: bool = False
    ) -> None:
        super().__init__()
        c, h, w = shape
        if c % 2:
            raise ValueError(f"FactorOut needs an even number of channels, got {c}")
        self.inner = inner
        self.shape = tuple(shape)
        self.half = (c // 2, h, w)
        self.n_out = math.prod(self.half)
        if learned_prior:
            self.prior_mean = nn.Parameter(torch.zeros(self.half))
            self.prior_log_std = nn.Parameter(torch.zeros(self.half))
        else:
            self.prior_mean = self.prior_log_std = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, x2 = x.chunk(2, dim=1)
        logdet = zero_logdet(x)
        if self.prior_mean is not None:
            z1 = (z1 - self.prior_mean) * torch.exp(-self.prior_log_std)
            logdet = logdet - self.prior_log_std.sum()
        y2, ld = self.inner(x2, context)
        return torch.cat([z1.reshape(x.shape[0], -1), y2], 1), logdet + ld

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        z1 = y[:, : self.n_out].reshape(y.shape[0], *self.half)
        if self.prior_mean is not None:
            z1 = z1 * torch.exp(self.prior_log_std) + self.prior_mean
        x2 = self.inner.inverse(y[:, self.n_out :], context)
        return torch.cat([z1, x2], 1)
