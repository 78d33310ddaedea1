"""The monotone rational-quadratic spline transformer of neural spline flows.

Durkan, Bekasov, Murray & Papamakarios (2019), Neural Spline Flows. On ``[-B, B]`` the
map is a spline of ``K`` bins, each a ratio of two quadratics (Gregory & Delbourgo
1982) fixed by the bins' widths and heights and the derivatives at the ``K + 1``
knots; outside it is the identity, so the boundary derivatives are 1 and the map is
continuously differentiable everywhere. Its inverse solves one quadratic per element
(no bisection), and its log-derivative is closed-form.

With ``xi = (x - x_k) / w_k`` in bin ``k``, ``s_k = h_k / w_k`` and knot derivatives
``d_k, d_{k+1}``:

    y = y_k + h_k (s_k xi^2 + d_k xi (1 - xi)) / (s_k + (d_k + d_{k+1} - 2 s_k) xi (1 - xi))

    dy/dx = s_k^2 (d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2)
            / (s_k + (d_k + d_{k+1} - 2 s_k) xi (1 - xi))^2

A conditioner gives ``3K - 1`` unconstrained numbers per element: ``K`` widths and
``K`` heights (a softmax, with a floor per bin) and the ``K - 1`` interior derivatives
(a softplus, with a floor).

>>> import torch
>>> spline = RationalQuadraticSpline(bins=4, bound=3.0)
>>> x = torch.tensor([[-5.0, -1.0, 0.5, 7.0]])
>>> params = torch.randn(1, spline.n_params, 4)
>>> y, logdet = spline(x, params)
>>> y[0, 0].item(), y[0, 3].item(), logdet[0, 0].item()  # identity outside [-3, 3]
(-5.0, 7.0, 0.0)
>>> back, _ = spline.inverse(y, params)
>>> torch.allclose(back, x, atol=1e-5)
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from resflow.layers.transformers import Transformer

MIN_BIN = 1e-3
"""Smallest width or height of a bin, as a fraction of the interval."""

MIN_DERIVATIVE = 1e-3
"""Smallest derivative at an interior knot."""


class RationalQuadraticSpline(Transformer):
    """A monotone rational-quadratic spline of ``bins`` bins on ``[-bound, bound]``,
    the identity outside (see the module docstring).

    Arguments:
        bins: ``K``, the number of bins.
        bound: ``B``; inputs outside ``[-B, B]`` pass unchanged with logdet 0.
        min_bin: smallest bin width and height, as a fraction of ``2B``.
        min_derivative: smallest derivative at an interior knot.
        clamp: ``c`` soft-clamps every unconstrained parameter to ``c tanh(p / c)``, so
            that no conditioner output, however far its input lies from the data, makes
            a bin so flat that its inverse loses float32 precision (``None``: the
            paper's map).

    A zero ``params`` tensor gives equal bins and unit derivatives: the identity. A
    conditioner whose last layer starts at zero therefore starts at it.
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 3.0,
        min_bin: float = MIN_BIN,
        min_derivative: float = MIN_DERIVATIVE,
        clamp: float | None = None,
    ) -> None:
        super().__init__()
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not (bound > 0 and math.isfinite(bound)):
            raise ValueError(f"bound must be a finite number > 0, got {bound}")
        if not 0 < min_bin * bins < 1:
            raise ValueError(f"min_bin * bins must be in (0, 1), got {min_bin} * {bins}")
        if not min_derivative > 0:
            raise ValueError(f"min_derivative must be > 0, got {min_derivative}")
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be > 0 (or None), got {clamp}")
        self.clamp = clamp
        self.bins = bins
        self.bound = float(bound)
        self.min_bin = min_bin
        self.min_derivative = min_derivative
        self.n_params = 3 * bins - 1
        # softplus(c) = 1 - min_derivative: zero params give unit interior derivatives
        self._shift = math.log(math.expm1(1.0 - min_derivative))

    def extra_repr(self) -> str:
        clamp = "" if self.clamp is None else f", clamp={self.clamp:g}"
        return f"bins={self.bins}, bound={self.bound:g}{clamp}"

    def knots(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_knots, y_knots, derivatives)``, each ``[..., K + 1]`` on the last axis,
        from ``params`` ``[B, 3K - 1, *shape]`` (elements on the leading axes)."""
        k = self.bins
        p = params.movedim(1, -1)  # [B, *shape, 3K - 1]
        if self.clamp is not None:  # c tanh(p / c): no bin or slope without bound
            p = self.clamp * torch.tanh(p / self.clamp)
        xs = self._cumulative(p[..., :k])
        ys = self._cumulative(p[..., k : 2 * k])
        inner = self.min_derivative + F.softplus(p[..., 2 * k :] + self._shift)
        one = torch.ones_like(p[..., :1])
        return xs, ys, torch.cat([one, inner, one], -1)

    def _cumulative(self, raw: Tensor) -> Tensor:
        """Knot positions on ``[-B, B]`` from unconstrained bin sizes (first and last
        exactly at the ends)."""
        size = self.min_bin + (1 - self.min_bin * self.bins) * torch.softmax(raw, -1)
        inner = torch.cumsum(size, -1)[..., :-1]
        ends = torch.ones_like(raw[..., :1])
        knots = torch.cat([-ends, 2 * inner - 1, ends], -1)
        return knots * self.bound

    def _bin(self, knots: Tensor, v: Tensor) -> Tensor:
        """Index ``k`` with ``knots[k] <= v < knots[k + 1]`` (the last bin holds ``B``)."""
        idx = torch.searchsorted(knots.contiguous(), v.unsqueeze(-1).contiguous(), right=True)
        return (idx.squeeze(-1) - 1).clamp(0, self.bins - 1)

    def _parts(
        self, params: Tensor, v: Tensor, along: str
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Of the bin holding each ``v`` (an ``x`` or a ``y``, per ``along``): its left
        knot ``(x_k, y_k)``, width, height, slope and end derivatives."""
        xs, ys, ds = self.knots(params)
        k = self._bin(xs if along == "x" else ys, v).unsqueeze(-1)
        k1 = k + 1

        def at(t: Tensor, i: Tensor) -> Tensor:
            return t.gather(-1, i).squeeze(-1)

        x0, y0 = at(xs, k), at(ys, k)
        w, h = at(xs, k1) - x0, at(ys, k1) - y0
        return x0, y0, w, h, h / w, at(ds, k), at(ds, k1)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        inside = (x >= -self.bound) & (x <= self.bound)
        xc = x.clamp(-self.bound, self.bound)  # outside: computed on the edge, then dropped
        x0, y0, w, h, s, d0, d1 = self._parts(params, xc, "x")
        xi = ((xc - x0) / w).clamp(0, 1)
        mix = xi * (1 - xi)
        denom = s + (d0 + d1 - 2 * s) * mix
        y = y0 + h * (s * xi.square() + d0 * mix) / denom
        slope = s.square() * (d1 * xi.square() + 2 * s * mix + d0 * (1 - xi).square())
        logdet = slope.log() - 2 * denom.log()
        return torch.where(inside, y, x), torch.where(inside, logdet, torch.zeros_like(logdet))

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        inside = (y >= -self.bound) & (y <= self.bound)
        yc = y.clamp(-self.bound, self.bound)
        x0, y0, w, h, s, d0, d1 = self._parts(params, yc, "y")
        dy = yc - y0
        curve = d0 + d1 - 2 * s
        a = h * (s - d0) + dy * curve
        b = h * d0 - dy * curve
        c = -s * dy
        disc = (b.square() - 4 * a * c).clamp_min(0)
        xi = ((2 * c) / (-b - disc.sqrt())).clamp(0, 1)  # the root in [0, 1], stable form
        x = x0 + xi * w
        mix = xi * (1 - xi)
        denom = s + curve * mix
        slope = s.square() * (d1 * xi.square() + 2 * s * mix + d0 * (1 - xi).square())
        logdet = 2 * denom.log() - slope.log()
        return torch.where(inside, x, y), torch.where(inside, logdet, torch.zeros_like(logdet))
