"""Estimators of ``log det(I + J_g)`` for invertible residual blocks.

``log det(I + J) = sum_{k>=1} (-1)^{k+1} tr(J^k) / k`` when ``Lip(g) < 1``.

* **exact** -- the full Jacobian (one vector-Jacobian product per dimension) and
  ``slogdet``; for small dimensions (2-D data, tests).
* **truncated** -- the first ``n`` terms with Hutchinson's trace estimator
  (i-ResNet, Behrmann et al. 2019); biased.
* **Russian roulette** -- Residual Flows (Chen et al. 2019), Theorem 1:
  ``sum_{k=1}^{n} (-1)^{k+1}/k * v^T J^k v / P(N >= k)`` with ``n = n_exact + N``,
  ``N ~ Geometric(p)`` or ``Poisson(lambda)``, ``v ~ N(0, I)``; unbiased.
  ``v^T J^k`` is always computed by repeated vector-Jacobian products.

Gradients either flow through the series by ordinary backprop, or come from the
**Neumann gradient series** (Theorem 2),
``d/dtheta log det(I+J) = E[(sum_{k=0}^{n} (-1)^k / P(N>=k) v^T J^k) dJ/dtheta v]``,
whose memory does not grow with ``n``. With **backward-in-forward** the gradient of
the logdet with respect to the block's input and parameters is computed during the
forward pass and its graph freed at once (§3.2; :mod:`resflow.layers.residual.in_forward`).

>>> survival(1, 2, "poisson", 0.5, 2.0)  # the first terms are always computed
1.0
>>> draw_terms(3, "none", 0.5, 2.0)
(3, [1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from resflow.config import Config, param
from resflow.layers.residual.jacobian import VJP, Linearization

Method = Literal["exact", "series", "auto"]
Dist = Literal["geometric", "poisson", "none"]

AUTO_EXACT_MAX_DIM = 16
"""``method="auto"`` takes the exact log-determinant for blocks of at most this many
dimensions per example (fewer Jacobian products than the 20-term evaluation series, and
no estimation noise), the power series above it."""


@dataclass(frozen=True)
class LogdetEstimator:
    """How a residual block estimates its log-determinant (one per mode).

    Attributes:
        method: ``"exact"`` (full Jacobian + slogdet), ``"series"`` (power series) or
            ``"auto"`` (exact for at most :data:`AUTO_EXACT_MAX_DIM` dimensions, else the
            series; see :meth:`resolve`).
        n_exact_terms: terms always computed (paper: 2 in training, 20 at evaluation).
        dist: distribution of the extra number of terms: ``"geometric"``,
            ``"poisson"`` (unbiased Russian roulette) or ``"none"`` (truncated after
            ``n_exact_terms``, biased -- the i-ResNet estimator).
        n_hutchinson: number of Hutchinson vectors averaged per sample.
        neumann_grad: gradients from the Neumann series instead of backprop through
            the power series (memory constant in the number of terms).
        grad_in_forward: compute the logdet gradient inside the forward pass and free
            its graph (memory constant in the number of blocks for the logdet path).
            Requires every sample's logdet to get the same upstream gradient.
    """

    method: Method = "series"
    n_exact_terms: int = 2
    dist: Dist = "poisson"
    n_hutchinson: int = 1
    neumann_grad: bool = True
    grad_in_forward: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("exact", "series", "auto"):
            raise ValueError(
                f"unknown logdet method {self.method!r}; use 'exact', 'series' or 'auto'"
            )
        if self.dist not in ("geometric", "poisson", "none"):
            raise ValueError(
                f"unknown roulette distribution {self.dist!r}; use 'geometric', 'poisson' or 'none'"
            )
        if self.n_exact_terms < 0 or (self.dist == "none" and self.n_exact_terms < 1):
            raise ValueError(
                f"n_exact_terms must be >= 1 when truncating, got {self.n_exact_terms}"
            )
        if self.n_hutchinson < 1:
            raise ValueError(f"n_hutchinson must be >= 1, got {self.n_hutchinson}")

    @property
    def biased(self) -> bool:
        """Whether the estimate is biased: a series truncated without a roulette tail."""
        return self.method == "series" and self.dist == "none"

    def resolve(self, dim: int) -> LogdetEstimator:
        """This estimator for blocks of ``dim`` dimensions per example: ``"auto"`` becomes
        ``"exact"`` up to :data:`AUTO_EXACT_MAX_DIM` dimensions and ``"series"`` above."""
        if self.method != "auto":
            return self
        return _resolved(self, "exact" if dim <= AUTO_EXACT_MAX_DIM else "series")


@functools.lru_cache(maxsize=256)
def _resolved(est: LogdetEstimator, method: Method) -> LogdetEstimator:
    return dataclasses.replace(est, method=method)


TRAIN_ESTIMATOR = LogdetEstimator()
"""Paper default for training: 2 exact terms + Poisson(2) roulette, Neumann, in-forward."""
EVAL_ESTIMATOR = LogdetEstimator(
    method="auto", n_exact_terms=20, neumann_grad=False, grad_in_forward=False
)
"""Default for evaluation: the exact logdet for small blocks, else the paper's 20 exact
terms + the unbiased roulette tail."""
EXACT_ESTIMATOR = LogdetEstimator(method="exact", neumann_grad=False, grad_in_forward=False)
"""Full Jacobian + slogdet (small dimensions only)."""


def truncated_estimator(n_terms: int = 5, **kwargs: object) -> LogdetEstimator:
    """The biased i-ResNet estimator: the first ``n_terms`` terms, no roulette."""
    return LogdetEstimator(n_exact_terms=n_terms, dist="none", **kwargs)  # type: ignore[arg-type]


def survival(k: int, n_exact: int, dist: Dist, geom_p: float, lam: float) -> float:
    """``P(n_exact + N >= k)``: probability that the k-th term is computed."""
    j = k - n_exact
    if j <= 0:
        return 1.0
    if dist == "none":
        return 0.0
    if dist == "geometric":  # N in {1, 2, ...}
        return (1.0 - geom_p) ** (j - 1)
    # Poisson, N in {0, 1, ...}: P(N >= j) = 1 - sum_{i<j} e^-lam lam^i / i!
    cdf = sum(math.exp(-lam + i * math.log(lam) - math.lgamma(i + 1)) for i in range(j))
    return max(1.0 - cdf, 1e-300)


def draw_terms(n_exact: int, dist: Dist, geom_p: float, lam: float) -> tuple[int, list[float]]:
    """Draw the number of terms ``n`` and the weights ``1 / P(n >= k)`` for k = 0..n."""
    if dist == "none":
        n = n_exact
    elif dist == "geometric":
        n = n_exact + int(torch.empty(()).geometric_(geom_p))
    else:
        n = n_exact + int(torch.poisson(torch.tensor(float(lam))))
    return n, [1.0 / survival(k, n_exact, dist, geom_p, lam) for k in range(n + 1)]


def _vjp(out: Tensor, x: Tensor, w: Tensor, create_graph: bool) -> Tensor:
    (g,) = torch.autograd.grad(out, x, w, retain_graph=True, create_graph=create_graph)
    return g


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


def _graph_free_vjp(gx: Tensor, x: Tensor, vjp: VJP | None) -> VJP:
    """The fast closure when available, else autograd without a graph."""
    return vjp if vjp is not None else (lambda w: _vjp(gx, x, w, create_graph=False))


def exact_logdet(gx: Tensor, x: Tensor, create_graph: bool, vjp: VJP | None = None) -> Tensor:
    """``log|det(I + dg/dx)|`` per sample from the full Jacobian (D vector-Jacobian products).

    ``vjp`` (see :mod:`resflow.layers.residual.jacobian`) computes the rows without autograd when
    no graph is needed."""
    b = x.shape[0]
    d = x[0].numel()
    if d > 4096:
        raise ValueError(f"exact logdet needs a {d}x{d} Jacobian per sample; use method='series'")
    fast = _graph_free_vjp(gx, x, vjp)
    rows = []
    for i in range(d):
        e = torch.zeros_like(x).view(b, d)
        e[:, i] = 1.0
        row = _vjp(gx, x, e.view_as(x), True) if create_graph else fast(e.view_as(x))
        rows.append(row.reshape(b, d))
    jac = torch.stack(rows, 1)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.slogdet(eye + jac)[1]


@torch.no_grad()
def exact_pairs(lin: Linearization, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """``log|det(I + J)|`` per sample from the full Jacobian, and the pairs ``(e_j, w_j)``
    with ``w_j`` the ``j``-th column of ``(I + J)^{-T}``: since
    ``d log|det A| = tr(A^{-1} dA)``, ``d/dtheta sum_j w_j^T J e_j`` (``w`` fixed) is the
    exact gradient of the log-determinant. For vectors (``x`` of shape ``[batch, d]``)
    all ``d`` columns ``J e_j`` come from one stacked forward-mode pass, whose tangents
    the gradient pass then reuses; other inputs take ``d`` rows ``e_i^T J``."""
    b = x.shape[0]
    d = x[0].numel()
    if d > 4096:
        raise ValueError(f"exact logdet needs a {d}x{d} Jacobian per sample; use method='series'")
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    basis = eye.unsqueeze(1).expand(d, b, d)  # basis[j] = e_j for every sample
    if x.dim() == 2 and lin.vector:
        jac = lin.jvp(basis).permute(1, 2, 0)  # [b, i, j] = dg_i / dx_j
    else:
        jac = torch.stack([lin.vjp(e.reshape_as(x)).reshape(b, d) for e in basis], 1)
    value, inv_t = logdet_and_inverse_t(jac + eye)
    if x.dim() == 2 and lin.vector:
        return value, [(basis, inv_t.permute(2, 0, 1))]  # one stacked pair
    return value, [(basis[j].reshape_as(x), inv_t[:, :, j].reshape_as(x)) for j in range(d)]


def logdet_and_inverse_t(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(log|det a|, a^{-T})`` of a batch of square matrices; ``2 x 2`` in closed form."""
    if a.shape[-1] == 2:
        det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
        # a^{-T} = [[a11, -a10], [-a01, a00]] / det
        inv_t = torch.stack([a[:, 1, 1], -a[:, 1, 0], -a[:, 0, 1], a[:, 0, 0]], 1)
        return det.abs().log(), inv_t.view(-1, 2, 2) / det.view(-1, 1, 1)
    return torch.linalg.slogdet(a)[1], torch.linalg.inv(a).transpose(1, 2)


def _constants(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """``values`` on ``like``'s device and dtype, copied without waiting for the device."""
    t = torch.as_tensor(values, dtype=like.dtype)
    if like.device.type == "cpu":
        return t
    return (t.pin_memory() if like.device.type == "cuda" else t).to(like.device, non_blocking=True)


def series_from_jacobian(
    jac: Tensor, est: LogdetEstimator, n_terms: int, weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """The power-series estimate per sample from the explicit Jacobians ``jac`` of a few
    dimensions (``[batch, d, d]``, ``J`` without the identity), and its cotangent
    ``G = d estimate / d J`` (``[batch, d, d]``): of the series itself, or of the Neumann
    gradient estimator's surrogate ``w^T J v`` (``est.neumann_grad``). Draws the same
    Hutchinson vectors as :func:`series_logdet` on inputs ``[batch, d]`` and gives its
    value; the products ``J^k v`` are ``d x d`` ones instead of passes through ``g``.

    With ``c_k = (-1)^{k+1} / (k P(N >= k))`` the estimate is ``sum_k c_k v^T J^k v``
    and ``d (v^T J^k v) / dJ = sum_{m<k} (J^T)^m v (J^{k-1-m} v)^T``, so
    ``G = A H B^T`` with ``A``, ``B`` the columns ``(J^T)^m v``, ``J^l v`` and
    ``H[m, l] = c_{m+l+1}``.
    """
    b, d, _ = jac.shape
    coef = [0.0] + [(1.0 if k % 2 else -1.0) / k * weights[k] for k in range(1, n_terms + 1)]
    value = jac.new_zeros(b)
    cot = jac.new_zeros(b, d, d)
    jac_t = jac.transpose(1, 2)
    coefs = _constants(coef, jac)
    signs = _constants([(-1.0) ** k * weights[k] for k in range(n_terms + 1)], jac)
    if not est.neumann_grad:
        idx = torch.arange(n_terms)
        table = torch.tensor(coef + [0.0] * n_terms, dtype=torch.float64)
        hankel = _constants(table[idx[:, None] + idx + 1], jac)
    for _ in range(est.n_hutchinson):
        v = torch.randn(b, d, 1, dtype=jac.dtype, device=jac.device)
        powers = [v]  # J^k v
        for _k in range(n_terms):
            powers.append(torch.bmm(jac, powers[-1]))
        right = torch.cat(powers, 2)  # [b, d, n + 1]
        value = value + ((v * right).sum(1) * coefs).sum(1)
        if est.neumann_grad:  # d/dJ (w^T J v), w = sum_k (-1)^k / P(N >= k) (J^T)^k v
            left = [v]
            for _k in range(n_terms):
                left.append(torch.bmm(jac_t, left[-1]))
            w = (torch.cat(left, 2) * signs).sum(2, keepdim=True)
            cot = cot + w @ v.transpose(1, 2)
        elif n_terms > 0:
            left = [v]
            for _k in range(n_terms - 1):
                left.append(torch.bmm(jac_t, left[-1]))
            cot = cot + torch.cat(left, 2) @ hankel @ right[:, :, :n_terms].transpose(1, 2)
    return value / est.n_hutchinson, cot / est.n_hutchinson


def series_logdet(
    gx: Tensor,
    x: Tensor,
    est: LogdetEstimator,
    n_terms: int,
    weights: Sequence[float],
    create_graph: bool,
    vjp: VJP | None = None,
) -> Tensor:
    """Power-series estimate of the logdet per sample.

    With ``create_graph`` and ``est.neumann_grad`` the result's *value* is the series
    estimate and its *gradient* is the Neumann-series gradient estimator. Products that
    need no graph go through ``vjp`` when given.
    """
    fast = _graph_free_vjp(gx, x, vjp)
    total = x.new_zeros(x.shape[0])
    for _ in range(est.n_hutchinson):
        v = torch.randn_like(x)
        w = v
        value = x.new_zeros(x.shape[0])
        if create_graph and est.neumann_grad:
            neumann = v
            for k in range(1, n_terms + 1):
                w = fast(w)
                sign = 1.0 if k % 2 else -1.0
                value = value + sign / k * weights[k] * _dot(w, v)
                neumann = neumann - sign * weights[k] * w
            # d/dtheta of (neumann^T J v) is the Neumann gradient estimator.
            surrogate = _dot(_vjp(gx, x, neumann.detach(), create_graph=True), v)
            value = value.detach() + surrogate - surrogate.detach()
        else:
            for k in range(1, n_terms + 1):
                w = _vjp(gx, x, w, create_graph=True) if create_graph else fast(w)
                sign = 1.0 if k % 2 else -1.0
                value = value + sign / k * weights[k] * _dot(w, v)
        total = total + value
    return total / est.n_hutchinson


@torch.no_grad()
def neumann_pairs(
    vjp: VJP, x: Tensor, est: LogdetEstimator, n_terms: int, weights: Sequence[float]
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """The series estimate and, per Hutchinson vector ``v``, the Neumann vector
    ``w = sum_{k=0}^{n} (-1)^k / P(N >= k) (J^T)^k v`` whose ``d/dtheta (w^T J v)`` is the
    Neumann gradient estimator. Draws the same random numbers as :func:`series_logdet`."""
    value = x.new_zeros(x.shape[0])
    pairs = []
    for _ in range(est.n_hutchinson):
        v = torch.randn_like(x)
        w, neumann = v, v
        for k in range(1, n_terms + 1):
            w = vjp(w)
            sign = 1.0 if k % 2 else -1.0
            value = value + sign / k * weights[k] * _dot(w, v)
            neumann = neumann - sign * weights[k] * w
        pairs.append((v, neumann))
    return value / est.n_hutchinson, pairs


def estimate_logdet(
    gx: Tensor,
    x: Tensor,
    est: LogdetEstimator,
    geom_p: float,
    lam: float,
    create_graph: bool,
    vjp: VJP | None = None,
) -> Tensor:
    """Estimate ``log det(I + dg/dx)`` per sample for ``gx = g(x)``.

    ``x`` must require grad unless ``vjp`` is given and ``create_graph`` is off."""
    if est.method == "exact":
        return exact_logdet(gx, x, create_graph, vjp)
    n, weights = draw_terms(est.n_exact_terms, est.dist, geom_p, lam)
    return series_logdet(gx, x, est, n, weights, create_graph, vjp)


BlockPath = Literal["auto", "fused", "closed_form", "in_forward", "autograd", "graph_free"]
"""How a residual block computes ``g(x)``, its logdet and their gradients
(:meth:`~resflow.layers.residual.block.ResidualBlock.choose_path` says when each
applies): ``"auto"`` the fastest that applies; ``"fused"`` the exact logdet of a small
dense branch as two pure functions (:mod:`resflow.layers.residual.fused`);
``"closed_form"`` the branch's cached linearization with the closed-form (exact or
Neumann-series) gradient, computed in the forward pass
(:func:`~resflow.layers.residual.jacobian.neumann_branch`); ``"in_forward"`` autograd
products with the gradient computed in the forward pass
(:func:`~resflow.layers.residual.in_forward.grad_in_forward`); ``"autograd"`` autograd
products, backpropagated through the estimate (no graph kept when no gradient is
wanted); ``"graph_free"`` no gradients, products without autograd."""
BLOCK_PATHS: tuple[str, ...] = get_args(BlockPath)


@dataclass
class EstimatorConfig(Config):
    """Log-determinant estimation of every residual block of a model (paper defaults).

    Training: ``n_exact_terms`` + roulette over ``dist`` (``"none"``: the series truncated
    after ``n_exact_terms``, i-ResNet's biased objective). Evaluation -- every figure
    resflow prints, ``log_prob`` in eval mode, scores and sampling checks -- always
    estimates the true log-density: ``eval_method="auto"`` takes the exact logdet for
    blocks of at most :data:`AUTO_EXACT_MAX_DIM` dimensions, else ``eval_exact_terms`` +
    an unbiased tail over ``eval_dist`` (default: ``dist``, or Poisson when training
    truncates). ``biased_eval_terms > 0`` also reports a truncated series of that many
    terms (i-ResNet's paper figure), labelled as biased beside the true one. ``path``
    forces one computation path on every block (:data:`BlockPath`; default ``"auto"``,
    the fastest that applies, the same numbers).
    """

    train_method: Method = param("series", help="exact, series or auto (exact for small blocks)")
    eval_method: Method = param("auto", help="exact, series or auto (exact for small blocks)")
    n_exact_terms: int = param(2, ge=0, help="power-series terms always computed in training")
    eval_exact_terms: int = param(20, ge=0, help="power-series terms always computed at evaluation")
    dist: Dist = param("poisson", help="roulette distribution of the extra terms (none: truncate)")
    eval_dist: Dist | None = param(
        None, help="roulette distribution at evaluation (null: dist, or poisson if dist is none)"
    )
    geom_p: float = param(0.5, gt=0, lt=1, help="success probability of the geometric roulette")
    poisson_lambda: float = param(2.0, gt=0, help="rate of the Poisson roulette")
    n_hutchinson: int = param(1, ge=1, help="Hutchinson vectors per sample")
    neumann_grad: bool = param(True, help="Neumann-series gradients (constant memory in terms)")
    grad_in_forward: bool = param(True, help="logdet gradients inside the forward pass")
    biased_eval_terms: int = param(
        0, ge=0, help="also report a series truncated after this many terms (biased), 0: off"
    )
    path: BlockPath = param(
        "auto",
        help="computation path of every block: auto (the fastest that applies), fused, "
        "closed_form, in_forward, autograd or graph_free (for checks and measurements)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path not in BLOCK_PATHS:
            raise ValueError(f"unknown block path {self.path!r}; use one of {BLOCK_PATHS}")
        if self.eval_dist == "none":
            raise ValueError(
                "estimator.eval_dist=none would print a biased figure (a truncated series) "
                "as the log-likelihood; evaluation is always unbiased -- set "
                "estimator.biased_eval_terms=N to report the truncated series beside it"
            )

    def estimators(self) -> tuple[LogdetEstimator, LogdetEstimator]:
        """The ``(train, eval)`` estimators."""
        train = LogdetEstimator(
            method=self.train_method,
            n_exact_terms=self.n_exact_terms,
            dist=self.dist,
            n_hutchinson=self.n_hutchinson,
            neumann_grad=self.neumann_grad,
            grad_in_forward=self.grad_in_forward,
        )
        dist = self.eval_dist or (self.dist if self.dist != "none" else "poisson")
        ev = LogdetEstimator(
            method=self.eval_method,
            n_exact_terms=self.eval_exact_terms,
            dist=dist,
            n_hutchinson=self.n_hutchinson,
            neumann_grad=False,
            grad_in_forward=False,
        )
        return train, ev

    def biased_estimator(self) -> LogdetEstimator | None:
        """The truncated series reported beside the true figure, or ``None``."""
        if self.biased_eval_terms == 0:
            return None
        return truncated_estimator(
            self.biased_eval_terms,
            n_hutchinson=self.n_hutchinson,
            neumann_grad=False,
            grad_in_forward=False,
        )
