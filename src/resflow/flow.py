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
        latent_shape: event shape of the latent (default: ``shape``; image models
            with a fully connected tail or factor-out have a flat latent).
        levels: quantization levels of discrete data (256 for 8-bit images), used for
            bits/dim; ``None`` for continuous data.
    """

    def __init__(
        self,
        layers: FlowLayer | list[FlowLayer],
        shape: tuple[int, ...],
        base: nn.Module | None = None,
        latent_shape: tuple[int, ...] | None = None,
        levels: int | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers if isinstance(layers, FlowLayer) else Sequential(layers)
        self.shape = tuple(shape)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else self.shape
        self.levels = levels
        self.base = base if base is not None else StandardNormal(self.latent_shape)

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

    def bits_per_dim(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Bits/dim per sample: ``-(log p(y) - D log(levels)) / (D ln 2)`` for discrete
        data (``y`` the dequantized data in ``[0, 1)``), ``-log p(x) / (D ln 2)`` else."""
        logp = self.log_prob(x, context)
        if self.levels is not None:
            logp = logp - self.dim * math.log(self.levels)
        return -logp / (self.dim * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` samples ``f^{-1}(z)``, ``z ~ base`` scaled by ``temperature``."""
        return self.inverse(self.base.sample(n, temperature), context)
