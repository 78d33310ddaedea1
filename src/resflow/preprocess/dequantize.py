"""Dequantization: from integer levels to a continuous density (Theis et al. 2016).

A dequantizer maps integer data ``x in {0..L-1}^D`` to ``y = (x + u) / L in [0, 1)^D``
with noise ``u ~ q(u | x)`` on ``[0, 1)^D``. It is a *stochastic layer* (see
:mod:`resflow.layers.base`): its logdet is

    ``-D log L - log q(u | x)``

(the scaling by ``1/L`` and the noise density), so that the model's
``log p_base(z) + sum(logdets)`` estimates a lower bound on the discrete
log-likelihood ``log P(x)`` (Jensen), and bits/dim is simply ``-log P / (D ln 2)``.
Uniform dequantization has ``q = 1``; a variational dequantizer (Flow++, Ho et al.
2019) implements :meth:`Dequantizer.noise` with a conditional flow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from resflow.layers.base import FlowLayer
from resflow.value_checks import require


class Dequantizer(FlowLayer):
    """Base of dequantizers: subclasses implement :meth:`noise`.

    Input: integer levels ``0..levels-1`` (any dtype; other values are refused). Output:
    ``(x + u) / levels``; ``inverse`` quantizes back, ``floor(y * levels)`` clamped.
    """

    stochastic = True

    def __init__(self, levels: int = 256) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.levels = levels

    def noise(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(u, log q(u | x))``: noise in ``[0, 1)`` shaped like ``x`` and its
        log-density per sample."""
        raise NotImplementedError(f"{type(self).__name__} must implement noise")

    def _check(self, x: Tensor) -> Tensor:
        xf = x.float() if not x.is_floating_point() else x
        top = self.levels - 1
        require(
            ((xf < 0) | (xf > top)).any(),
            lambda: ValueError(
                f"expected integer levels in [0, {top}], got values in "
                f"[{float(xf.min()):g}, {float(xf.max()):g}]"
            ),
        )
        require(
            (xf != torch.floor(xf)).any(),
            lambda: ValueError(
                f"expected integer levels in [0, {top}], got non-integer values "
                "(pass the raw quantized data, not data already scaled or dequantized)"
            ),
        )
        return xf

    def scale_logdet(self, y: Tensor) -> Tensor:
        """``-D log(levels)`` per sample: the log-Jacobian of ``y = (x + u) / levels``."""
        d = y[0].numel()
        return y.new_full((y.shape[0],), -d * math.log(self.levels))

    @staticmethod
    def in_bin(x: Tensor, u: Tensor) -> Tensor:
        """``x + u`` kept inside ``x``'s bin ``[x, x + 1)`` in ``x``'s dtype: the sum
        rounds up to ``x + 1`` for ``u`` close to 1 (float32: ``255 + (1 - 2**-24)`` is
        256), so it is clamped to the largest number below ``x + 1`` (only draws within
        a rounding step of 1 move, by less than that step; ``log q(u | x)`` is kept)."""
        return torch.minimum(x + u, torch.nextafter(x + 1, x))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xf = self._check(x)
        u, log_q = self.noise(xf, context)
        y = self.in_bin(xf, u) / self.levels
        return y, self.scale_logdet(y) - log_q

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.floor(y * self.levels).clamp(0, self.levels - 1)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The quantized data and ``+D log(levels)`` (minus the scaling term; the noise
        term of a variational dequantizer needs the noise, which the inverse drops)."""
        return self.inverse(y, context), -self.scale_logdet(y)


class UniformDequantizer(Dequantizer):
    """``u ~ U[0, 1)^D``, ``log q = 0``: the standard uniform dequantization (drawn in
    training and evaluation alike, as the papers evaluate)."""

    def noise(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.rand_like(x), x.new_zeros(x.shape[0])


Dequantize = UniformDequantizer
"""The name used before dequantizers had an interface."""
