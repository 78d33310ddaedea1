"""Gaussian noise augmentation (TarFlow's sample-quality mode, Zhai et al. 2025).

``y = x + sigma * eps`` with ``eps ~ N(0, I)``, drawn in training and evaluation
alike: the model is then a density of the *noisy* data, and its log-likelihood (and
bits/dim) is that of the noisy data, not comparable with a likelihood-mode model's
(:meth:`GaussianNoise.density_note` says so in every evaluation). Learning the noisy
density is easier and gives better samples; the noise is removed at sampling time by
one step of Tweedie's formula with the model's own score,

    ``x_hat = y + sigma^2 * grad_y log p(y)``,

which is ``E[x | y]`` when ``p`` is the density of the noisy data
(:func:`resflow.evaluation.decode` with ``denoise=True``).

References:
    Zhai et al. (2025), Normalizing flows are capable generative models (TarFlow).
    Efron (2011), Tweedie's formula and selection bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resflow.layers.base import FlowLayer, zero_logdet


class GaussianNoise(FlowLayer):
    """``y = x + std * eps`` (logdet 0: the model's density is of ``y``); the inverse is
    the identity (denoising is a separate step, see the module docstring).

    Example:
        >>> layer = GaussianNoise(0.1)
        >>> x = torch.zeros(10000, 1)
        >>> round(float(layer(x)[0].std()), 1)
        0.1
        >>> torch.equal(layer.inverse(x), x)
        True
    """

    stochastic = True

    def __init__(self, std: float) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"the noise std must be > 0, got {std}")
        self.std = std

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x + self.std * torch.randn_like(x), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return y

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return y, zero_logdet(y)

    def density_note(self) -> str:
        """What an evaluation of a model with this layer measures."""
        return (
            f"of the noisy data (Gaussian noise augmentation, std {self.std:g} on the "
            "dequantized [0, 1] scale): not comparable with likelihood-mode bits/dim"
        )
