"""Vector p-norms, their duals and norm orders, fixed or learned: the one place where
``p``, ``p* = p / (p - 1)`` and ``||x||_p`` are computed.

>>> import torch
>>> float(pnorm(torch.tensor([3.0, -4.0]), 2.0))
5.0
>>> conjugate(1.0), conjugate(INF), conjugate(4.0)
(inf, 1.0, 1.3333333333333333)
>>> reciprocal(INF), order_from_reciprocal(0.25)
(0.0, 4.0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INF = math.inf


class NormOrder(nn.Module):
    """A learned norm order ``p = 1 + softplus(raw)`` in ``(1, inf)``, shareable by layers.

    >>> round(float(NormOrder(3.0).value().detach()), 6)
    3.0
    """

    def __init__(self, init: float = 2.0) -> None:
        super().__init__()
        if not 1.0 < init < INF:
            raise ValueError(f"a learned norm order must start in (1, inf), got {init}")
        self.raw = nn.Parameter(torch.tensor(math.log(math.expm1(init - 1.0))))

    def value(self) -> Tensor:
        return 1.0 + F.softplus(self.raw)


Order = float | NormOrder
"""A norm order: a fixed number in ``[1, inf]`` or a learned :class:`NormOrder`."""


def order_value(p: Order) -> Tensor | float:
    """The value of a norm order: the number, or the learned order's current tensor."""
    return p.value() if isinstance(p, NormOrder) else p


def conjugate(p: Tensor | float) -> Tensor | float:
    """The dual order ``p* = p / (p - 1)`` (``1* = inf``, ``inf* = 1``), so that
    ``1/p + 1/p* = 1``."""
    if isinstance(p, Tensor):
        return p / (p - 1.0)
    if p == 1.0:
        return INF
    if p == INF:
        return 1.0
    return p / (p - 1.0)


def reciprocal(p: float) -> float:
    """The coordinate ``a = 1/p`` of an order (``0`` for ``p = inf``)."""
    return 0.0 if p == INF else 1.0 / p


def order_from_reciprocal(a: float) -> float:
    """The order ``p`` of the coordinate ``a = 1/p`` (``inf`` for ``a <= 0``)."""
    return INF if a <= 0.0 else 1.0 / a


def pnorm(x: Tensor, p: Tensor | float, repeat: int = 1) -> Tensor:
    """``||x||_p`` of the whole tensor, every entry counted ``repeat`` times;
    differentiable in ``x`` and in a tensor ``p`` (a learned order, ``repeat = 1``)."""
    if isinstance(p, Tensor):
        a = x.abs().flatten()
        m = a.max().clamp_min(1e-30)
        return m * ((a / m) ** p).sum() ** (1.0 / p)
    norm = torch.linalg.vector_norm(x.flatten(), ord=p)
    return norm if repeat == 1 or p == INF else repeat ** (1.0 / p) * norm


def dual(x: Tensor, p: Tensor | float) -> Tensor:
    """A unit vector in the dual norm ``p*`` attaining ``<dual, x> = ||x||_p``.

    >>> dual(torch.tensor([3.0, -4.0]), 2.0).tolist()
    [0.6000000238418579, -0.800000011920929]
    """
    p = float(p)
    if p == INF:
        flat = x.flatten()
        out = torch.zeros_like(flat)
        i = flat.abs().argmax()
        out[i] = torch.sign(flat[i]) if flat[i] != 0 else 1.0
        return out.view_as(x)
    if p == 1.0:
        return torch.sign(x)
    if p == 2.0:
        return x / torch.linalg.vector_norm(x).clamp_min(1e-30)
    n = pnorm(x, p).clamp_min(1e-30)
    return torch.sign(x) * (x.abs() / n) ** (p - 1.0)
