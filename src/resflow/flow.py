"""A normalizing flow: invertible layers (data -> latent) plus a base distribution."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from resflow.distributions import StandardNormal
from resflow.layers.base import FlowLayer, Sequential, check_finite


class Flow(nn.Module):
    """``log p(x) = log p_base(f(x)) + log|det df/dx|`` for ``f`` = the layers in order.

    Args:
        layers: a flow layer (or list of layers, composed in order) mapping data to
            latent.
        base: base distribution with ``log_prob(z)`` and ``sample(n, temperature)``;
            default standard normal over ``shape``.
        shape: event shape of the data (``(D,)`` or ``(C, H, W)``).
    """

    def __init__(
        self,
        layers: FlowLayer | list[FlowLayer],
        shape: tuple[int, ...],
        base: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers if isinstance(layers, FlowLayer) else Sequential(layers)
        self.shape = tuple(shape)
        self.base = base if base is not None else StandardNormal(self.shape)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"expected data of shape [B, {', '.join(map(str, self.shape))}], "
                f"got {list(x.shape)}"
            )
        check_finite(x)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, logdet)`` for data ``x``."""
        self._check(x)
        return self.layers(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Data ``x`` for latent ``z``."""
        return self.layers.inverse(z, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` per sample (an unbiased estimate for stochastic logdets)."""
        z, logdet = self(x, context)
        return self.base.log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` samples ``f^{-1}(z)``, ``z ~ base`` scaled by ``temperature``."""
        return self.inverse(self.base.sample(n, temperature), context)
