"""Certified upper bounds on mixed operator norms ``||W||_{p->q}`` of dense and
convolution operators (Residual Flows, Chen et al. 2019, Appendix D), and the closed
forms where they exist.

Exact for ``p = 1`` (largest column ``q``-norm), ``q = inf`` (largest row
``p*``-norm) and ``p = q = 2`` (:mod:`resflow.layers.residual.spectral_bounds`); every
other pair gets the least of these safe upper bounds (:func:`mixed_norm_bound`):

* ``|| (||w_j||_q)_j ||_{p*}`` over the columns ``w_j`` (Hoelder on ``sum_j x_j w_j``)
  and ``|| (||w^i||_{p*})_i ||_q`` over the rows;
* Riesz--Thorin: ``log ||W||_{p->q}`` is convex in ``(1/p, 1/q)`` (for complex
  scalars; the complex norm bounds the real one and equals it on the exact pairs
  above), so interpolation between exact pairs bounds the points between them, which
  are all pairs with ``p <= q``;
* for ``p > q`` the inclusions ``||x||_r <= n^{1/r - 1/p} ||x||_p`` (``r <= p``) and
  ``||y||_q <= m^{1/q - 1/s} ||y||_s`` (``s >= q``) move to a pair with ``r <= s``.

>>> import torch
>>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
>>> float(mixed_norm_bound(dense_facts(w), 1.0, 2.0))  # the largest column 2-norm
4.47213595499958
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from resflow.layers.residual.norms import (
    INF,
    NormOrder,
    Order,
    conjugate,
    order_from_reciprocal,
    pnorm,
    reciprocal,
)
from resflow.layers.residual.spectral_bounds import conv_spectral_norm, spectral_norm

NormVector = Callable[[float], Tensor]
"""``r -> `` the vector of ``r``-norms of an operator's columns (or rows)."""


def closed_form_norm(w: Tensor, domain: Order, codomain: Order) -> Tensor | None:
    """``||W||_{p -> q}`` exactly where a closed form exists, else ``None``: ``q = inf``
    gives the largest ``p*``-norm of a row, ``p = 1`` the largest ``q``-norm of a column
    (for a convolution, the kernel's output and input slices)."""
    if isinstance(domain, NormOrder) or isinstance(codomain, NormOrder):
        return None
    p, q = float(domain), float(codomain)
    if q == INF:
        return torch.linalg.vector_norm(w.flatten(1), ord=conjugate(p), dim=1).max()
    if p == 1.0:
        return torch.linalg.vector_norm(w.transpose(0, 1).flatten(1), ord=q, dim=1).max()
    return None


def is_exact_pair(p: float, q: float) -> bool:
    """Whether ``||.||_{p->q}`` has a closed form here: ``p = 1``, ``q = inf`` or
    ``p = q = 2``."""
    return p == 1.0 or q == INF or (p == 2.0 and q == 2.0)


@dataclass(frozen=True)
class OperatorFacts:
    """What a mixed-norm bound needs to know about an operator ``R^n -> R^m``.

    Attributes:
        columns: ``r -> `` the ``r``-norms of the columns (or upper bounds on them);
            every entry stands for ``repeat`` columns.
        rows: ``r -> `` the ``r``-norms of the rows, likewise.
        spectral: a certified ``||A||_{2->2}``.
        n_in, n_out: ``n`` and ``m``.
        repeat: how many columns (rows) each entry of ``columns`` (``rows``) stands for.
    """

    columns: NormVector
    rows: NormVector
    spectral: Callable[[], Tensor]
    n_in: int
    n_out: int
    repeat: int = 1

    def exact(self, a: float, b: float) -> Tensor:
        """The closed form at ``(1/p, 1/q)`` on the lines ``a = 1`` or ``b = 0`` or at
        ``(1/2, 1/2)``."""
        if a >= 1.0:
            return self.columns(order_from_reciprocal(b)).max()
        if b <= 0.0:
            return self.rows(conjugate(order_from_reciprocal(a))).max()
        assert a == b == 0.5
        return self.spectral()


def _interpolated(f: OperatorFacts, a: float, b: float, steps: int) -> Tensor | None:
    """The Riesz--Thorin bound at ``(a, b)`` with ``a >= b`` (else ``None``): the least
    of ``N(P0)^(1-t) N(P1)^t`` over pairs of exact points with ``(1-t) P0 + t P1 = (a, b)``
    -- one on ``a = 1`` and one on ``b = 0`` (``steps + 1`` values of ``t``), or
    ``(1/2, 1/2)`` and one on either line."""
    if a < b:
        return None
    if (a, b) == (0.5, 0.5):
        return f.exact(0.5, 0.5)

    def mix(t: float, p0: tuple[float, float], p1: tuple[float, float]) -> Tensor:
        n0, n1 = f.exact(*p0).double(), f.exact(*p1).double()
        return n0 ** (1.0 - t) * n1**t

    candidates = []
    lo, hi = 1.0 - a, 1.0 - b  # (a, b) = (1 - t) (1, b / (1 - t)) + t ((a - 1 + t) / t, 0)
    for i in range(steps + 1):
        t = lo + (hi - lo) * i / steps
        if t <= 0.0:
            candidates.append(f.exact(1.0, b).double())
        elif t >= 1.0:
            candidates.append(f.exact(a, 0.0).double())
        else:
            b0, a1 = min(b / (1.0 - t), 1.0), min(max((a - 1.0 + t) / t, 0.0), 1.0)
            candidates.append(mix(t, (1.0, b0), (a1, 0.0)))
    if a > 0.5:  # (a, b) = (1 - t) (1/2, 1/2) + t (1, beta)
        t = 2.0 * a - 1.0
        beta = (b - (1.0 - t) / 2.0) / t
        if 0.0 <= beta <= 1.0:
            candidates.append(mix(t, (0.5, 0.5), (1.0, beta)))
    if b < 0.5:  # (a, b) = (1 - t) (1/2, 1/2) + t (alpha, 0)
        t = 1.0 - 2.0 * b
        alpha = (a - (1.0 - t) / 2.0) / t
        if 0.0 <= alpha <= 1.0:
            candidates.append(mix(t, (0.5, 0.5), (alpha, 0.0)))
    return torch.stack(candidates).min()


def mixed_norm_bound(f: OperatorFacts, p: float, q: float, steps: int = 32) -> Tensor:
    """A certified upper bound on ``||A||_{p->q}``, float64 (exact where
    :func:`is_exact_pair`).

    The least of: the column bound ``|| (||a_j||_q)_j ||_{p*}``, the row bound
    ``|| (||a^i||_{p*})_i ||_q``, the Riesz--Thorin interpolation of exact pairs (for
    ``p <= q``), and for ``p > q`` the norm inclusions onto the diagonal ``r = s`` in
    ``[q, p]``: ``n^{1/r - 1/p} m^{1/q - 1/r} ||A||_{r->r}`` (``steps + 1`` points).
    """
    a, b = reciprocal(p), reciprocal(q)
    if a >= 1.0 or b <= 0.0 or (a, b) == (0.5, 0.5):
        return f.exact(a, b).double()
    ps = conjugate(p)
    best = torch.minimum(
        pnorm(f.columns(q).double(), ps, f.repeat), pnorm(f.rows(ps).double(), q, f.repeat)
    )
    inner = _interpolated(f, a, b, steps)
    if inner is not None:
        return torch.minimum(best, inner)
    for i in range(steps + 1):  # p > q
        c = a + (b - a) * i / steps
        diag = _interpolated(f, c, c, steps)
        assert diag is not None
        best = torch.minimum(best, f.n_in ** (c - a) * f.n_out ** (b - c) * diag)
    return best


def _once(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    cache: list[Tensor] = []

    def get() -> Tensor:
        if not cache:
            cache.append(fn())
        return cache[0]

    return get


def dense_facts(w: Tensor) -> OperatorFacts:
    """:class:`OperatorFacts` of a dense matrix ``w`` (``m x n``)."""
    wd = w.detach().double()
    return OperatorFacts(
        columns=lambda r: torch.linalg.vector_norm(wd, ord=r, dim=0),
        rows=lambda r: torch.linalg.vector_norm(wd, ord=r, dim=1),
        spectral=_once(lambda: spectral_norm(wd)),
        n_in=wd.shape[1],
        n_out=wd.shape[0],
    )


def conv_facts(kernel: Tensor, size: tuple[int, int], padding: tuple[int, int]) -> OperatorFacts:
    """:class:`OperatorFacts` of a stride-1 'same' convolution on ``C_in x size``.

    A column of the operator is the input slice ``K[:, c]`` of the kernel placed at a
    pixel (cropped at the border), a row the output slice ``K[o]``; the whole slices
    bound them, with equality at interior pixels. Each stands for ``H W`` columns.
    """
    k = kernel.detach().double()
    o, c = k.shape[:2]
    hw = size[0] * size[1]
    return OperatorFacts(
        columns=lambda r: torch.linalg.vector_norm(k.transpose(0, 1).reshape(c, -1), ord=r, dim=1),
        rows=lambda r: torch.linalg.vector_norm(k.reshape(o, -1), ord=r, dim=1),
        spectral=_once(lambda: conv_spectral_norm(k, size, padding).value),
        n_in=c * hw,
        n_out=o * hw,
        repeat=hw,
    )
