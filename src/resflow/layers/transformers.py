"""Elementwise transformers: the invertible scalar maps inside coupling and
autoregressive layers.

A transformer ``T(x; theta)`` is a strictly increasing map of each element ``x`` given
its own parameters ``theta`` (computed by a conditioner). ``params`` has shape
``[B, n_params, *x.shape[1:]]``: parameter ``i`` of every element is ``params[:, i]``,
which has the shape of ``x``. Log-determinants are returned *elementwise*
(``log |dT/dx|``, shape of ``x``); the layer sums them over the elements it transforms.

* :class:`Affine` -- ``y = x * s(h) + t`` (RealNVP, Dinh et al. 2017; Glow, Kingma &
  Dhariwal 2018);
* :class:`Additive` -- ``y = x + t`` (NICE, Dinh et al. 2015);
* :class:`MonotoneTransformer` -- any map given by its forward formula only; it is
  inverted numerically by :func:`bisection_inverse` (Flow++'s logistic-mixture CDF in
  :mod:`resflow.layers.logistic_mixture`, NAF's sigmoidal flows, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScaleKind = Literal["exp", "sigmoid", "softplus", "tanh"]


class BracketNotFoundError(RuntimeError):
    """:func:`bisection_inverse` could not find an interval containing the target."""


class Transformer(nn.Module):
    """Base class of an elementwise, strictly increasing map ``y = T(x; theta)``.

    Subclasses set :attr:`n_params` and implement :meth:`forward` and :meth:`inverse`.
    """

    #: Number of parameters per transformed element.
    n_params: int = 0

    def check_params(self, x: Tensor, params: Tensor) -> None:
        """Raise ``ValueError`` unless ``params`` has shape ``[B, n_params, *x.shape[1:]]``."""
        expected = (x.shape[0], self.n_params, *x.shape[1:])
        if tuple(params.shape) != expected:
            raise ValueError(
                f"{type(self).__name__} expects params of shape [B, n_params, *x.shape[1:]] "
                f"= {expected}, got {tuple(params.shape)}"
            )

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|dy/dx|)`` elementwise."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|dx/dy|)`` elementwise, with ``x = T^{-1}(y)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement inverse")


class Affine(Transformer):
    """``y = x * s(h) + t`` with ``params = (h, t)`` and ``log|dy/dx| = log s(h)``.

    References:
        Dinh, Sohl-Dickstein & Bengio (2017), Density estimation using Real NVP.
        Kingma & Dhariwal (2018), Glow: generative flow with invertible 1x1 convolutions.
        Papamakarios, Pavlakou & Murray (2017), Masked autoregressive flow for density
        estimation (``s = exp(h)``).

    Arguments:
        scale: how the unconstrained ``h`` becomes a positive scale:
            ``"exp"``: ``s = exp(h)`` (RealNVP, MAF), or ``s = exp(c tanh(h / c))``
            with ``clamp = c``;
            ``"sigmoid"``: ``s = sigmoid(h + 2)`` (Glow; bounded in ``(0, 1)``);
            ``"softplus"``: ``s = softplus(h) + eps``;
            ``"tanh"``: ``s = exp(tanh(h))`` (Flow++'s affine coupling; in ``(1/e, e)``).
            Only ``"exp"`` and ``"tanh"`` are the identity at ``h = t = 0`` (a zero-initialised
            conditioner); the other two start at ``s = 0.88`` and ``0.69 + eps``.
        eps: lower bound of the softplus scale (unused by the others).
        clamp: with ``"exp"`` only: soft-clamp the log-scale to ``(-clamp, clamp)``,
            ``log s = clamp * tanh(h / clamp)`` (``h - h^3 / (3 clamp^2) + ...`` near 0).
            A conditioner's ``h`` grows without bound far from its training data (an MLP
            is asymptotically linear), so the plain ``exp`` overflows there: ``log p(x)``
            becomes ``-inf`` and the inverse ``NaN`` a short way from the data. With the
            clamp every layer's scale lies in ``(e^-clamp, e^clamp)``, so the map and its
            inverse stay finite and Lipschitz for every finite input. ``None`` (default):
            the unbounded ``exp``, for conditioners that bound ``h`` themselves (RealNVP's
            ``scale * tanh``).

    The inverse is closed-form: ``x = (y - t) / s(h)``, ``log|dx/dy| = -log s(h)``.

    Example:
        >>> T = Affine("exp", clamp=3.0)
        >>> x = torch.randn(4, 3)
        >>> params = torch.zeros(4, 2, 3)
        >>> y, logdet = T(x, params)
        >>> bool(torch.equal(y, x)), float(logdet.abs().max())
        (True, 0.0)
        >>> float(T.log_scale(torch.tensor(1e4)))  # at most clamp, never overflows
        3.0
    """

    n_params = 2

    def __init__(
        self, scale: ScaleKind = "exp", eps: float = 1e-3, clamp: float | None = None
    ) -> None:
        super().__init__()
        if scale not in ("exp", "sigmoid", "softplus", "tanh"):
            raise ValueError(
                f"unknown scale {scale!r}; choose 'exp', 'sigmoid', 'softplus' or 'tanh'"
            )
        if scale == "softplus" and not eps > 0:
            raise ValueError(f"eps must be positive for the softplus scale, got {eps}")
        if clamp is not None and (scale != "exp" or not clamp > 0):
            raise ValueError(
                f"clamp must be positive and goes with the 'exp' scale, got clamp={clamp} "
                f"with scale={scale!r}"
            )
        self.scale = scale
        self.eps = eps
        self.clamp = clamp

    def extra_repr(self) -> str:
        out = f"scale={self.scale!r}"
        if self.scale == "softplus":
            out += f", eps={self.eps}"
        if self.clamp is not None:
            out += f", clamp={self.clamp}"
        return out

    def log_scale(self, h: Tensor) -> Tensor:
        """``log s(h)``, computed stably for each scale kind."""
        if self.scale == "exp":
            return h if self.clamp is None else self.clamp * torch.tanh(h / self.clamp)
        if self.scale == "sigmoid":
            return F.logsigmoid(h + 2.0)
        if self.scale == "tanh":
            return torch.tanh(h)
        return torch.log(F.softplus(h) + self.eps)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(x, params)
        log_s = self.log_scale(params[:, 0])
        return x * log_s.exp() + params[:, 1], log_s

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(y, params)
        log_s = self.log_scale(params[:, 0])
        return (y - params[:, 1]) * torch.exp(-log_s), -log_s


class Additive(Transformer):
    """``y = x + t`` with ``params = (t,)``: volume preserving, ``log|dy/dx| = 0``.

    References:
        Dinh, Krueger & Bengio (2015), NICE: non-linear independent components estimation.
    """

    n_params = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(x, params)
        return x + params[:, 0], torch.zeros_like(x)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(y, params)
        return y - params[:, 0], torch.zeros_like(y)


def _bracket(
    fn: Callable[[Tensor], Tensor], y: Tensor, lo: Tensor, hi: Tensor, max_expansions: int
) -> tuple[Tensor, Tensor]:
    """Grow ``[lo, hi]`` elementwise until ``fn(lo) <= y <= fn(hi)``.

    An element whose target lies left of ``lo`` moves its interval left and doubles its
    width (``[lo - 2w, lo]``), and symmetrically to the right.
    """
    for _ in range(max_expansions + 1):
        f_lo, f_hi = fn(lo), fn(hi)
        if torch.isnan(f_lo).any() or torch.isnan(f_hi).any():
            raise BracketNotFoundError("fn returned NaN while searching for a bracket")
        left, right = f_lo > y, f_hi < y
        if not bool((left | right).any()):
            return lo, hi
        width = hi - lo
        lo, hi = (
            torch.where(left, lo - 2 * width, torch.where(right, hi, lo)),
            torch.where(left, lo, torch.where(right, hi + 2 * width, hi)),
        )
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            break
    n_bad = int((left | right).sum())
    raise BracketNotFoundError(
        f"no bracket [lo, hi] with fn(lo) <= y <= fn(hi) for {n_bad} element(s) after "
        f"{max_expansions} doublings; is fn increasing and unbounded enough to reach "
        f"y in [{float(y.min()):.4g}, {float(y.max()):.4g}]?"
    )


@torch.no_grad()
def bisection_inverse(
    fn: Callable[[Tensor], Tensor],
    y: Tensor,
    lower: float | Tensor = -1.0,
    upper: float | Tensor = 1.0,
    max_expansions: int = 64,
) -> Tensor:
    """Solve ``fn(x) = y`` elementwise for an increasing elementwise ``fn``, by bisection.

    All elements are solved at once (vectorized). The steps are:

    1. *Bracket*: start from ``[lower, upper]`` (floats or tensors broadcastable to
       ``y``) and, for each element whose target is outside, move the interval
       towards it and double its width, at most ``max_expansions`` times
       (:class:`BracketNotFoundError` otherwise).
    2. *Bisect* a fixed number of times ``n = max_i ceil(log2(w_i / tol_i))``, where
       ``w_i`` is element ``i``'s bracket width and
       ``tol_i = eps_dtype * max(1, min_{x in bracket_i} |x|)``. Every final interval
       is then no wider than ``tol_i``: the returned midpoint is within ``tol_i / 2``
       of the crossing of (the computed) ``fn``, i.e. at the dtype's resolution
       relative to ``|x|`` (absolute resolution ``eps_dtype`` below ``|x| = 1``).

    No gradient flows through the search; see :meth:`MonotoneTransformer.inverse` for
    the implicit-function gradient.

    Arguments:
        fn: elementwise, increasing map of a tensor shaped like ``y``.
        y: targets (a floating-point tensor; all finite, else ``ValueError``).
        lower, upper: initial bracket (``lower < upper``).
        max_expansions: most width doublings when searching for the bracket.

    Example:
        >>> y = torch.tensor([-1e3, 1.0, 8.0], dtype=torch.float64)
        >>> bisection_inverse(lambda x: x**3, y)
        tensor([-10.,   1.,   2.], dtype=torch.float64)
    """
    if not y.is_floating_point():
        raise ValueError(f"y must be a floating-point tensor, got {y.dtype}")
    if not torch.isfinite(y).all():
        n_bad = int((~torch.isfinite(y)).sum())
        raise ValueError(f"bisection_inverse: y contains {n_bad} non-finite value(s)")
    lo = torch.as_tensor(lower, dtype=y.dtype, device=y.device).expand_as(y).clone()
    hi = torch.as_tensor(upper, dtype=y.dtype, device=y.device).expand_as(y).clone()
    if not bool((lo < hi).all()):
        raise ValueError("bisection_inverse needs lower < upper")
    if y.numel() == 0:
        return lo
    lo, hi = _bracket(fn, y, lo, hi, max_expansions)

    eps = torch.finfo(y.dtype).eps
    inside = (lo <= 0) & (hi >= 0)
    smallest = torch.where(inside, torch.zeros_like(lo), torch.minimum(lo.abs(), hi.abs()))
    tol = eps * smallest.clamp(min=1.0)
    n_iter = int(math.ceil(float(torch.log2((hi - lo) / tol).max())))
    for _ in range(max(n_iter, 0)):
        mid = lo + (hi - lo) / 2
        right = fn(mid) < y
        lo = torch.where(right, mid, lo)
        hi = torch.where(right, hi, mid)
    return lo + (hi - lo) / 2


class MonotoneTransformer(Transformer):
    """A transformer defined by its forward formula only, inverted by bisection.

    Subclasses implement :meth:`forward` (an increasing map and its elementwise
    ``log dy/dx``). :meth:`inverse` solves ``T(x; theta) = y`` with
    :func:`bisection_inverse` from the bracket ``[lower, upper]`` (class attributes)
    and returns ``log|dx/dy| = -log T'(x)`` at the solution.

    The solution is made differentiable by the implicit function theorem: with the
    root ``x*`` held fixed, ``x = x* + r - stop_grad(r)`` for the Newton step
    ``r = (y - T(x*; theta)) / stop_grad(T'(x*))``, whose value is ``x*`` and whose
    gradients are ``dx/dy = 1 / T'`` and ``dx/dtheta = -(dT/dtheta) / T'``.
    """

    lower: float = -1.0
    upper: float = 1.0
    max_expansions: int = 64

    def bracket(self, y: Tensor, params: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """The initial bracket ``(lower, upper)`` of the bisection (floats or tensors
        shaped like ``y``); the class attributes by default. A transformer that can
        bound its inverse from its parameters overrides it (fewer bisection steps)."""
        return self.lower, self.upper

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(y, params)
        with torch.no_grad():
            lower, upper = self.bracket(y, params)
            x_star = bisection_inverse(
                lambda x: self.forward(x, params)[0],
                y,
                lower,
                upper,
                self.max_expansions,
            )
        if not (torch.is_grad_enabled() and (y.requires_grad or params.requires_grad)):
            return x_star, -self.forward(x_star, params)[1]
        y_star, logdet_star = self.forward(x_star, params)
        step = (y - y_star) * torch.exp(-logdet_star.detach())
        x = x_star + (step - step.detach())
        return x, -self.forward(x, params)[1]
