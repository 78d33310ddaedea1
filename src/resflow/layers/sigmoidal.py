"""Sigmoidal flows: the monotone transformers of Neural Autoregressive Flows (NAF).

A deep sigmoidal flow (DSF) maps each element by a weighted average of sigmoids, read
back on the logit scale,

    y = logit( sum_k w_k * sigmoid(a_k * x + b_k) ),   w on the simplex, a_k > 0,

and a deep *dense* sigmoidal flow (DDSF) stacks such layers with vector-valued hidden
states, every weight positive:

    h^(l+1) = logit( W^(l+1) sigmoid( a^(l+1) * (U^(l+1) h^(l)) + b^(l+1) ) ),

``h^(0) = x`` and ``h^(L) = y`` scalars, the rows of ``U`` and ``W`` on the simplex, ``a``
positive. Every function above is increasing, so ``dy/dx > 0``: the inverse is found by
bisection (:class:`~resflow.layers.transformers.MonotoneTransformer`).

Both are evaluated entirely in log space, so neither the output nor the log-derivative
saturates in float32:

* ``1 - sum_k w_k sigmoid(c_k) = sum_k w_k sigmoid(-c_k)``, so
  ``y = logsumexp(log w + logsigmoid(c)) - logsumexp(log w + logsigmoid(-c))``
  is exact for ``|y|`` far beyond 17, where ``sigmoid`` rounds to 1;
* the Jacobian of a layer has positive entries
  ``J[o, i] = W[o, k] a_k sigmoid(c_k) sigmoid(-c_k) U[k, i] / (D_o (1 - D_o))`` (summed
  over ``k``; ``D = W sigmoid(c)``), so the chain rule carries ``log dh/dx`` (``x`` is a
  scalar) from layer to layer by log-sum-exp.

At zero conditioned parameters (a zero-initialised conditioner) ``a = 1``, ``U`` and ``W``
nearly uniform and ``b`` spread over ``[-2, 2]`` across the hidden units: a smooth
increasing map whose units differ, so that their gradients differ too.

References:
    Huang, Krueger, Lacoste & Courville (2018), Neural autoregressive flows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.transformers import MonotoneTransformer

_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) = 1


def _lse_mix(logits: Tensor, u: Tensor) -> Tensor:
    """``LSE_k(logits[o, k] + u[..., k])`` for every row ``o``: ``[..., o]`` from ``u``
    ``[..., n]`` and ``logits`` ``[o, n]``, as one matrix product of max-shifted
    exponentials (no ``[..., o, n]`` tensor); exact log-sum-exps where that underflows."""
    r = logits.max(-1).values  # [o]
    m = u.max(-1, keepdim=True).values  # [..., 1]
    out = torch.matmul((u - m).exp(), (logits - r[:, None]).exp().transpose(0, 1)).log() + m + r
    if not bool(torch.isfinite(out).all()):  # a row's terms all below float range
        return torch.logsumexp(logits + u.unsqueeze(-2), dim=-1)
    return out


def _softmax_mix(logits: Tensor, shift: Tensor, h: Tensor) -> Tensor:
    """``sum_i softmax_i(logits[k, i] + shift[..., i]) h[..., i]`` for every row ``k``."""
    weights = (shift - shift.max(-1, keepdim=True).values).exp()  # [..., i], max 1
    e = (logits - logits.max(-1, keepdim=True).values).exp().transpose(0, 1)  # [i, k]
    den = torch.matmul(weights, e)
    if not bool((den > 0).all()):
        return (F.softmax(logits + shift.unsqueeze(-2), -1) * h.unsqueeze(-2)).sum(-1)
    return torch.matmul(weights * h, e) / den


class DDSF(MonotoneTransformer):
    """Deep dense sigmoidal flow: ``layers`` dense sigmoidal layers of ``hidden`` units.

    The hidden state has ``hidden`` components between layers (``1 -> hidden -> ... ->
    1``). The mixing matrices of layer ``l`` (``U``: ``hidden x i``, ``W``: ``o x
    hidden``) are learned parameters of this module, shifted per element by conditioned
    offsets, so the conditioner supplies few numbers per layer: ``a`` and ``b``
    (``hidden`` each), an offset of ``W``'s logits per hidden unit (``hidden``) and of
    ``U``'s logits per input (``i``, none when ``i = 1``). :attr:`n_params` is their sum
    over the layers (``3 * hidden`` for the DSF). ``U`` and ``W`` are the row-wise
    softmax of their logits, so every row stays on the simplex.

    Arguments:
        hidden: sigmoid units per layer (16 in the paper's experiments).
        layers: number of dense sigmoidal layers (1 is the DSF).
        min_slope: added to every ``a`` (a floor on the slopes, > 0 keeps the map
            strictly increasing where the sigmoids saturate).
        bound: soft-clamp every conditioned parameter, ``p -> bound * tanh(p / bound)``
            (``None``: unbounded, as in the paper). A conditioner's outputs grow without
            bound far from its training data; clamped, the map there is one of the maps
            it can take near the data.
        slope_floor: add ``slope_floor * x`` to the output, so that ``dy/dx >=
            slope_floor`` everywhere (0: the paper's map). Without it, units saturated on
            either side of a plateau give slopes that underflow (``e^-80`` far from the
            data of a trained NAF): the density there is finite but no float inverts the
            map. With both, ``tests/test_densities.py`` round-trips a trained NAF on
            ``[-100, 100]^2``.

    Example:
        >>> T = DDSF(hidden=8, layers=2)
        >>> x = torch.linspace(-3, 3, 5)[None]
        >>> params = torch.zeros(1, T.n_params, 5)  # the same map for every element
        >>> y, logdet = T(x, params)
        >>> bool((y.diff() > 0).all())
        True
        >>> x_rec, _ = T.inverse(y, params)
        >>> bool(torch.allclose(x_rec, x, atol=1e-5))
        True
    """

    lower = -4.0
    upper = 4.0

    def __init__(
        self,
        hidden: int = 16,
        layers: int = 2,
        min_slope: float = 1e-3,
        bound: float | None = None,
        slope_floor: float = 0.0,
    ) -> None:
        super().__init__()
        if bound is not None and not bound > 0:
            raise ValueError(f"bound must be positive (or None), got {bound}")
        if not slope_floor >= 0:
            raise ValueError(f"slope_floor must be >= 0, got {slope_floor}")
        self.bound, self.slope_floor = bound, slope_floor
        if hidden < 1 or layers < 1:
            raise ValueError(f"need hidden >= 1 and layers >= 1, got {hidden} and {layers}")
        if not min_slope >= 0:
            raise ValueError(f"min_slope must be >= 0, got {min_slope}")
        self.hidden, self.layers, self.min_slope = hidden, layers, min_slope
        dims = [1] + [hidden] * (layers - 1) + [1]
        self._dims = list(zip(dims[:-1], dims[1:]))
        self.n_params = sum(3 * hidden + (i if i > 1 else 0) for i, _ in self._dims)
        self.u_logits = nn.ParameterList(
            nn.Parameter(torch.empty(hidden, i).uniform_(-1e-3, 1e-3))
            for i, _ in self._dims
            if i > 1
        )
        self.w_logits = nn.ParameterList(
            nn.Parameter(torch.empty(o, hidden).uniform_(-1e-3, 1e-3)) for _, o in self._dims
        )
        offset = torch.linspace(-2.0, 2.0, hidden) if hidden > 1 else torch.zeros(1)
        self.register_buffer("b_offset", offset, persistent=False)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, layers={self.layers}" + self._extras()

    def _extras(self) -> str:
        out = "" if self.bound is None else f", bound={self.bound}"
        return out + (f", slope_floor={self.slope_floor}" if self.slope_floor else "")

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(x, params)
        if self.bound is not None:
            params = self.bound * torch.tanh(params / self.bound)
        p = params.movedim(1, -1)  # [..., n_params]
        n = self.hidden
        h = x.unsqueeze(-1)  # [..., 1]
        log_grad = x.new_zeros(*x.shape, 1)  # log dh/dx (x is a scalar), [..., d_l]
        at, u_index = 0, 0
        for (i, _), w_logits in zip(self._dims, self.w_logits):
            a = F.softplus(p[..., at : at + n] + _SOFTPLUS_ONE) + self.min_slope
            b = p[..., at + n : at + 2 * n] + self.b_offset.to(x.dtype)
            w_shift = p[..., at + 2 * n : at + 3 * n]
            at += 3 * n
            if i > 1:
                u_shift = p[..., at : at + i]
                at += i
                u_logits = self.u_logits[u_index]
                u_index += 1
                # U = softmax_i(u_logits + u_shift): pre = U h, log(U dh/dx) = mix - norm
                pre = _softmax_mix(u_logits, u_shift, h)
                both = _lse_mix(u_logits, torch.stack([u_shift + log_grad, u_shift], -2))
                log_dpre = both[..., 0, :] - both[..., 1, :]
            else:
                pre = h.expand(*x.shape, n)
                log_dpre = log_grad.expand(*x.shape, n)
            c = a * pre + b
            log_s, log_1ms = F.logsigmoid(c), F.logsigmoid(-c)
            inner = a.log() + log_s + log_1ms + log_dpre  # log(a s (1 - s) dpre/dx), [..., n]
            # with W = softmax_k(w_logits + w_shift) = exp(w_logits + w_shift) / Z:
            # log D = L(log s) - log Z, log(1 - D) = L(log(1 - s)) - log Z,
            # log dh/dx = L(inner) - log Z - log D - log(1 - D),  L(v) = LSE_k(w + shift + v)
            lse = _lse_mix(w_logits, w_shift.unsqueeze(-2) + torch.stack(
                [log_s, log_1ms, inner, torch.zeros_like(inner)], -2))  # fmt: skip
            lse_s, lse_1ms, lse_inner, log_z = lse.unbind(-2)  # each [..., o]
            h = lse_s - lse_1ms
            log_grad = lse_inner + log_z - lse_s - lse_1ms
        y, log_grad = h.squeeze(-1), log_grad.squeeze(-1)
        if self.slope_floor:
            y = y + self.slope_floor * x
            log_grad = torch.logaddexp(log_grad, log_grad.new_tensor(math.log(self.slope_floor)))
        return y, log_grad


class DSF(DDSF):
    """Deep sigmoidal flow ``y = logit(w . sigmoid(a * x + b))``: one sigmoidal layer.

    ``n_params = 3 * hidden`` (``a``, ``b``, ``w``).

    Example:
        >>> T = DSF(hidden=4)
        >>> T.n_params
        12
    """

    def __init__(
        self,
        hidden: int = 16,
        min_slope: float = 1e-3,
        bound: float | None = None,
        slope_floor: float = 0.0,
    ) -> None:
        super().__init__(hidden, 1, min_slope, bound, slope_floor)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}" + self._extras()
