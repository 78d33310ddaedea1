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

Two ways to make the noisy data:

* :class:`GaussianNoise` after a dequantizer: ``y = (x + u) / L + sigma eps`` (uniform
  ``u``; resflow's first noise mode);
* :class:`QuantizedGaussianNoise`, the TarFlow authors' ``noise_type=gaussian``: no
  uniform dequantization, ``y = x / (L - 1) + sigma eps`` straight from the integer
  levels (``[0, 1]``, both ends included, as ``ToTensor`` makes it).

References:
    Zhai et al. (2025), Normalizing flows are capable generative models (TarFlow).
    Efron (2011), Tweedie's formula and selection bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from resflow.layers.base import FlowLayer, zero_logdet
from resflow.value_checks import require


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


class QuantizedGaussianNoise(GaussianNoise):
    """``y = x / (levels - 1) + std * eps`` from integer levels ``x``, *without* uniform
    dequantization (the TarFlow authors' Gaussian noise mode).

    Its logdet is ``-D log(levels - 1)``, the Jacobian of the scaling alone, so that the
    model's log-density is that of the noisy data on the level scale,
    ``v = x + (levels - 1) std eps`` (a continuous density, like a dequantized
    model's, but of data that was never spread uniformly over its bins: not a bound
    on a discrete likelihood). ``inverse`` rounds to the nearest level, clamped.
    ``std`` is on the ``[0, 1]`` scale (a TarFlow ``noise_std`` on ``[-1, 1]`` halved).

    Example:
        >>> layer = QuantizedGaussianNoise(256, 0.025)
        >>> x = torch.full((20000, 1), 128.0)
        >>> y, logdet = layer(x)
        >>> round(float(y.mean()), 2), round(float(y.std()), 3)
        (0.5, 0.025)
        >>> torch.equal(layer.inverse(x / 255), x)
        True
    """

    def __init__(self, levels: int, std: float) -> None:
        super().__init__(std)
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.levels = levels

    def extra_repr(self) -> str:
        return f"levels={self.levels}, std={self.std:g}"

    def _scale_logdet(self, y: Tensor) -> Tensor:
        return y.new_full((y.shape[0],), -y[0].numel() * math.log(self.levels - 1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        top = self.levels - 1
        require(
            ((x < 0) | (x > top) | (x != torch.floor(x))).any(),
            lambda: ValueError(
                f"expected integer levels in [0, {top}], got values in "
                f"[{float(x.min()):g}, {float(x.max()):g}] (pass the raw quantized data)"
            ),
        )
        y = x / top + self.std * torch.randn_like(x)
        return y, self._scale_logdet(y)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.round(y * (self.levels - 1)).clamp(0, self.levels - 1)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(y), -self._scale_logdet(y)

    def density_note(self) -> str:
        return (
            f"of the noisy data (Gaussian noise of std {self.std:g} on the [0, 1] scale, "
            f"{2 * self.std:g} on [-1, 1], added to the levels / {self.levels - 1} without "
            "uniform dequantization), per unit of the level scale: not a discrete "
            "likelihood, not comparable with likelihood-mode bits/dim"
        )
