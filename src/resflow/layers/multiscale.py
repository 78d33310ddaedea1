"""Multi-scale plumbing: reshaping to vectors and factoring out half the channels.

Multi-scale models (RealNVP, Dinh et al. 2017; Glow; i-ResNet; Residual Flows for
images larger than 32x32) send half of the channels straight to the latent after a
squeeze and keep transforming the other half. A model's latent is a flat vector
``[B, D]``: :class:`FactorOut` flattens the factored half and concatenates it in front
of the (flat) output of the layers that continue on the other half. The factored
half's prior is pluggable: standard normal, a learned diagonal Gaussian
(:class:`DiagonalPrior`, i-ResNet) or a Gaussian conditioned on the kept half
(:class:`ConditionalPrior`, Glow's split).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer, Shape, zero_logdet


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

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(y), zero_logdet(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        if tuple(input_shape) != self.shape:
            raise ValueError(f"Flatten expects {self.shape}, got {tuple(input_shape)}")
        return (math.prod(self.shape),)


class SplitPrior(nn.Module):
    """A Gaussian prior of the factored half ``z1`` given the kept half ``x2``, written
    as the flow ``eps = (z1 - mu(x2)) * exp(-log_sigma(x2))`` into ``N(0, I)``, with
    logdet ``-sum log_sigma``. Subclasses implement :meth:`params`."""

    def params(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, z1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.params(x2)
        eps = (z1 - mu) * torch.exp(-log_sigma)
        logdet = -log_sigma.expand_as(z1).flatten(1).sum(1)
        return eps, logdet

    def inverse(self, eps: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """``(z1, log|det dz1/deps|)``."""
        mu, log_sigma = self.params(x2)
        return eps * torch.exp(log_sigma) + mu, log_sigma.expand_as(eps).flatten(1).sum(1)


class DiagonalPrior(SplitPrior):
    """A learned diagonal Gaussian, one mean and scale per factored element (i-ResNet)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.zeros(shape))

    def params(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.unsqueeze(0), self.log_std.unsqueeze(0)


class ConditionalPrior(SplitPrior):
    """``(mu, log_sigma) = net(x2)`` (Glow's split prior: a zero-initialised conv on the
    kept half); ``net`` maps ``[B, C2, H, W]`` to ``[B, 2 C1, H, W]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def params(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.net(x2).chunk(2, dim=1)
        return mu, log_sigma


class FactorOut(FlowLayer):
    """Factor out the first half of the channels; ``inner`` transforms the second half.

    Output: ``cat([prior(z1 | x2).flatten(1), inner(x2)], 1)`` where ``inner`` returns
    a flat ``[B, D2]``. ``prior=None`` is a standard normal (Residual Flows).
    """

    def __init__(
        self, inner: FlowLayer, shape: tuple[int, int, int], prior: SplitPrior | None = None
    ) -> None:
        super().__init__()
        c, h, w = shape
        if c % 2:
            raise ValueError(f"FactorOut needs an even number of channels, got {c}")
        self.inner = inner
        self.shape = tuple(shape)
        self.half = (c // 2, h, w)
        self.n_out = math.prod(self.half)
        self.prior = prior

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, x2 = x.chunk(2, dim=1)
        logdet = zero_logdet(x)
        if self.prior is not None:
            z1, logdet = self.prior(z1, x2)
        y2, ld = self.inner(x2, context)
        return torch.cat([z1.reshape(x.shape[0], -1), y2], 1), logdet + ld

    def _split(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[:, : self.n_out].reshape(y.shape[0], *self.half), y[:, self.n_out :]

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        z1, y2 = self._split(y)
        x2 = self.inner.inverse(y2, context)
        if self.prior is not None:
            z1, _ = self.prior.inverse(z1, x2)
        return torch.cat([z1, x2], 1)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, y2 = self._split(y)
        x2, logdet = self.inner.inverse_and_logdet(y2, context)
        if self.prior is not None:
            z1, ld = self.prior.inverse(z1, x2)
            logdet = logdet + ld
        return torch.cat([z1, x2], 1), logdet

    def output_shape(self, input_shape: Shape) -> Shape:
        if tuple(input_shape) != self.shape:
            raise ValueError(f"FactorOut expects {self.shape}, got {tuple(input_shape)}")
        inner = self.inner.output_shape(self.half)
        if len(inner) != 1:
            raise ValueError(f"FactorOut's inner layers must end flat, got shape {inner}")
        return (self.n_out + inner[0],)
