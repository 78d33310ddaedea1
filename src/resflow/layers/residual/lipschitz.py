"""Lipschitz-constrained linear and convolutional layers.

The weight is rescaled as ``W / max(1, sigma / c)`` where ``sigma`` bounds the induced
operator norm ``||W||_{p -> q}`` (``p`` = domain order, ``q`` = codomain order; both 2
gives the spectral norm of Miyato et al. 2018). For convolutions the norm is that of
the convolution *operator* on the actual input shape, not that of the reshaped kernel.

``sigma = r ||W v||_q / ||v||_p``: a power-iteration estimate at the persistent vector
``v`` (Behrmann et al. 2019; for ``p, q != 2`` the generalized power method of Residual
Flows, Chen et al. 2019, Appendix D), which is a *lower* bound on the norm, times a
correction ``r >= 1``. :meth:`LipschitzLayer.certify` sets ``r = u / estimate`` with
``u`` a certified *upper* bound (:mod:`resflow.layers.residual.norm_bounds`), so that
right after it ``sigma = u >= ||W||`` and the rescaled weight has
``||W / max(1, sigma / c)|| <= c``: a guarantee, not an estimate. Its power iteration
stops on the gap ``u - estimate``, not on the change of the estimate.

:func:`refresh_lipschitz` certifies every layer; ``after_optimizer_step`` (called by the
training loop after every step and by evaluation, sampling and model loading before
use) certifies every ``certify_every`` training steps (default
:data:`CERTIFY_EVERY`; certifying costs more than a power-iteration step) and always
in eval mode, and otherwise runs the cheap power iteration (:meth:`LipschitzLayer.refresh`)
with the correction of the last certificate. Where the norm has a closed form (``q =
inf`` or ``p = 1``), it is used directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.base import preserved_transient_state
from resflow.layers.residual.norm_bounds import (
    EXACT_LIMIT,
    MARGIN,
    OperatorFacts,
    conv_facts,
    conv_spectral_norm,
    dense_facts,
    mixed_norm_bound,
    one_thread,
    rounding_margin,
    spectral_bound_holds,
    spectral_norm,
    top_singular_vector,
)

INF = math.inf
CERTIFY_EVERY = 10
"""Training steps between certificates (the power iteration runs in between; a
training loop also certifies before every checkpoint, and eval mode always does).
Every step costs about x1.3 per step on the README's digits model (docs/RESULTS.md §9)."""


class NormOrder(nn.Module):
    """A learned norm order ``p = 1 + softplus(raw)`` in ``(1, inf)``, shareable by layers."""

    def __init__(self, init: float = 2.0) -> None:
        super().__init__()
        if not 1.0 < init < INF:
            raise ValueError(f"a learned norm order must start in (1, inf), got {init}")
        self.raw = nn.Parameter(torch.tensor(math.log(math.expm1(init - 1.0))))

    def value(self) -> Tensor:
        return 1.0 + F.softplus(self.raw)


Order = float | NormOrder


def closed_form_norm(w: Tensor, domain: Order, codomain: Order) -> Tensor | None:
    """``||W||_{p -> q}`` exactly where a closed form exists, else ``None``: ``q = inf``
    gives the largest ``p*``-norm of a row, ``p = 1`` the largest ``q``-norm of a column
    (for a convolution, the kernel's output and input slices)."""
    if isinstance(domain, NormOrder) or isinstance(codomain, NormOrder):
        return None
    p, q = float(domain), float(codomain)
    if q == INF:
        return torch.linalg.vector_norm(w.flatten(1), ord=_conjugate(p), dim=1).max()
    if p == 1.0:
        return torch.linalg.vector_norm(w.transpose(0, 1).flatten(1), ord=q, dim=1).max()
    return None


def _order(p: Order) -> Tensor | float:
    return p.value() if isinstance(p, NormOrder) else p


def _conjugate(p: Tensor | float) -> Tensor | float:
    if isinstance(p, Tensor):
        return p / (p - 1.0)
    if p == 1.0:
        return INF
    if p == INF:
        return 1.0
    return p / (p - 1.0)


def _norm(x: Tensor, p: Tensor | float) -> Tensor:
    """p-norm of the whole tensor (differentiable in ``x`` and in a tensor ``p``)."""
    if isinstance(p, Tensor):
        a = x.abs().flatten()
        m = a.max().clamp_min(1e-30)
        return m * ((a / m) ** p).sum() ** (1.0 / p)
    return torch.linalg.vector_norm(x.flatten(), ord=p)


def _dual(x: Tensor, p: Tensor | float) -> Tensor:
    """A unit vector in the dual norm ``p*`` attaining ``<dual, x> = ||x||_p``."""
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
    n = _norm(x, p).clamp_min(1e-30)
    return torch.sign(x) * (x.abs() / n) ** (p - 1.0)


class LipschitzLayer(nn.Module):
    """Shared machinery of the constrained layers: norm estimate, certificate, rescaling.

    Subclasses define ``_op(v)`` (the operator without bias, on a single domain
    element of shape ``[1, ...]``), ``_op_t(u)`` (its adjoint) and ``_facts(w)`` (the
    :class:`~resflow.layers.residual.norm_bounds.OperatorFacts` of weight ``w``).

    Where the induced norm has a closed form (``q = inf``: the largest ``p*``-norm of
    a row; ``p = 1``: the largest ``q``-norm of a column; for a convolution the rows
    and columns of its operator are the kernel's output and input slices), it is used
    exactly; otherwise ``sigma = r * estimate`` (see the module docstring).

    Buffers: ``v`` (power-iteration vector), ``sigma`` (the last estimate, a lower
    bound), ``ratio`` (``r``), ``upper`` (the last certified bound ``u``, 0 before the
    first certificate) and ``steps`` (training steps seen, for ``certify_every``).
    """

    weight: Tensor
    v: Tensor
    _shared_weight: Tensor | None = None  # see shared_scope
    _shared_group: tuple[list[LipschitzLinear], bool] | None = None
    sigma: Tensor
    ratio: Tensor
    upper: Tensor
    steps: Tensor

    def _init_lipschitz(
        self,
        coeff: float,
        domain: Order,
        codomain: Order,
        atol: float,
        rtol: float,
        max_iter: int,
        init_iter: int,
        certify_every: int | None = None,
    ) -> None:
        certify_every = CERTIFY_EVERY if certify_every is None else certify_every
        if not 0.0 < coeff:
            raise ValueError(f"coeff must be positive, got {coeff}")
        for name, p in (("domain", domain), ("codomain", codomain)):
            if not isinstance(p, NormOrder) and not (p >= 1.0):
                raise ValueError(f"{name} norm order must be >= 1 (or inf), got {p}")
        if certify_every < 1:
            raise ValueError(f"certify_every must be >= 1, got {certify_every}")
        self.coeff = coeff
        self.domain = domain
        self.codomain = codomain
        self.atol, self.rtol, self.max_iter, self.init_iter = atol, rtol, max_iter, init_iter
        self.certify_every = certify_every
        self.register_buffer("sigma", torch.ones(()))
        self.register_buffer("ratio", torch.ones(()))
        self.register_buffer("upper", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _op(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _op_t(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _facts(self, w: Tensor) -> OperatorFacts:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("ratio", "upper", "steps"):  # checkpoints from before certificates
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _float_orders(self) -> tuple[float, float]:
        return float(_order(self.domain)), float(_order(self.codomain))

    def _power_step(self, v: Tensor, wv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step of the (generalized) power method from ``v`` (with ``wv = W v``):
        ``(v', W v', ||W v'||_q / ||v'||_p)``."""
        p, q = self._float_orders()
        v = _dual(self._op_t(_dual(wv, q)), _conjugate(p))
        wv = self._op(v)
        return v, wv, _norm(wv, q) / _norm(v, p).clamp_min(1e-30)

    def _estimate(self, v: Tensor) -> Tensor:
        """``||W v||_q / ||v||_p`` exactly as :meth:`operator_norm` computes it."""
        p, q = _order(self.domain), _order(self.codomain)
        return _norm(self._op(v), q) / _norm(v, p).clamp_min(1e-30)

    @torch.no_grad()
    def refresh(
        self, atol: float | None = None, rtol: float | None = None, max_iter: int | None = None
    ) -> int:
        """The cheap update between certificates: power iteration until the estimate
        settles, ``|sigma_k - sigma_{k-1}| <= atol + rtol sigma_k``, or ``max_iter``
        iterations; the correction ``r`` of the last certificate is kept. Returns the
        iterations. This alone guarantees nothing (see :meth:`certify`)."""
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        max_iter = self.max_iter if max_iter is None else max_iter
        closed = self._closed_form_norm()
        if closed is not None:
            self.sigma.copy_(closed)
            return 0
        if self.v.numel() == 0:
            return 0  # a convolution that has not seen an input yet
        v, sigma, it = self.v, self.sigma.clone(), 0
        wv = self._op(v)
        while it < max_iter:
            it += 1
            v, wv, new = self._power_step(v, wv)
            done = abs(float(new - sigma)) <= atol + rtol * float(new)
            sigma = new
            if done:
                break
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        return it

    @torch.no_grad()
    def certified_norm(
        self, weight: Tensor | None = None, guess: float | None = None
    ) -> Tensor | None:
        """A certified upper bound on ``||weight||_{p->q}`` (default: the raw weight),
        float64; exact for 2 -> 2 on operators that fit
        :data:`~resflow.layers.residual.norm_bounds.EXACT_LIMIT` and for the pairs of
        :func:`~resflow.layers.residual.norm_bounds.is_exact_pair`; for 2 -> 2 a
        ``guess`` that a Cholesky test confirms is returned instead. ``None`` for a
        convolution that has not seen an input."""
        if self.v.numel() == 0:
            return None
        w = self.weight if weight is None else weight
        p, q = self._float_orders()
        if (p, q) == (2.0, 2.0):
            return self._spectral_bound(w, guess)
        return mixed_norm_bound(self._facts(w), p, q)

    def _spectral_bound(self, w: Tensor, guess: float | None) -> Tensor:
        raise NotImplementedError

    def _top_singular(self) -> tuple[Tensor, Tensor] | None:
        """The exact 2-norm (certified) and a top right singular vector, or ``None``."""
        raise NotImplementedError

    def _bound_holds(self, guess: float) -> bool | None:
        """Whether ``||W||_2 <= guess`` is confirmed (``None``: operator too large)."""
        raise NotImplementedError

    @torch.no_grad()
    def certify(
        self,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        settled: tuple[Tensor, Tensor, Tensor, int] | None = None,
    ) -> int:
        """Certify ``||W / max(1, sigma / c)|| <= c`` for the current weight.

        The power iteration runs until the gap between a certified upper bound ``u``
        and the lower bound ``sigma_k`` it gives closes, ``u - sigma_k <= atol + rtol
        u`` (``rtol`` at least the rounding level), or for ``max_iter`` iterations (where
        ``u`` is not exact the gap may stay open; the certificate holds regardless).
        For 2 -> 2, ``u = sigma_k (1 + rtol)`` is tried first (Cholesky test, see
        :func:`~resflow.layers.residual.norm_bounds.spectral_norm`), then the exact
        norm. Then ``r = u (1 + margin) / estimate``, so that the forward pass uses
        ``sigma = u (1 + margin) >= ||W||``; ``margin`` covers the rounding of the
        rescaled weight to the layer's dtype. Returns the iterations.

        ``settled``, from :func:`certify_all`: ``(v, W v, sigma, iterations)`` after a
        settling whose bound ``sigma (1 + rtol)`` the Cholesky test did not confirm;
        the certificate goes on from there (as it would have on its own).
        """
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        max_iter = self.max_iter if max_iter is None else max_iter
        closed = self._closed_form_norm()
        if closed is not None:
            for buf in (self.sigma, self.upper):
                buf.copy_(closed)
            self.ratio.fill_(1.0)
            return 0
        if self.v.numel() == 0:
            return 0
        eps = torch.finfo(self.weight.dtype).eps
        rtol = max(rtol, 64 * eps + 4e-8)  # the gap cannot close below rounding
        if float(self.weight.detach().abs().max()) == 0.0:
            upper, it = self.weight.new_zeros((), dtype=torch.float64), 0
        else:
            with one_thread():  # small operations: see one_thread
                upper, it = self._gap_closing_power_iteration(atol, rtol, max_iter, settled)
        est = float(self._estimate(self.v))
        margin = rounding_margin(self.weight.dtype, min(self._dims()))
        ratio = float(upper) * (1.0 + margin) / est if est > 0 else 1.0
        self.upper.copy_(upper)
        self.ratio.fill_(max(ratio, 1.0))
        return it

    def _gap_closing_power_iteration(
        self,
        atol: float,
        rtol: float,
        max_iter: int,
        settled: tuple[Tensor, Tensor, Tensor, int] | None = None,
    ) -> tuple[Tensor, int]:
        """Power iteration from ``v`` until ``u - sigma_k <= atol + rtol u``; returns
        ``(u, iterations)`` and leaves ``v`` and ``sigma`` set (``settled``: see
        :meth:`certify`)."""
        v, it = self.v, 0
        if settled is not None:
            v, wv, sigma, it = settled
        else:
            if float(self._estimate(v)) <= 0.0:  # v in the null space: a fixed draw
                gen = torch.Generator(device="cpu").manual_seed(0)
                v = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
            wv = self._op(v)
            sigma = self._estimate(v)
        quick = (float(_order(self.domain)), float(_order(self.codomain))) == (2.0, 2.0)
        upper: Tensor | None = None
        while it < max_iter or settled is not None:
            if upper is None and quick:  # settle a little, then try a bound just above
                holds: bool | None = False  # what the settled state's test found
                if settled is None:
                    prev = float(sigma)
                    while it < max_iter:
                        it += 1
                        v, wv, sigma = self._power_step(v, wv)
                        if abs(float(sigma) - prev) <= 0.25 * rtol * float(sigma):
                            break
                        prev = float(sigma)
                    guess = float(sigma) * (1.0 + rtol)
                    holds = self._bound_holds(guess)
                    if holds:  # confirmed: u - sigma_k = rtol sigma_k
                        upper = sigma.new_tensor(guess * (1.0 + MARGIN), dtype=torch.float64)
                        break
                settled = None
                top = self._top_singular() if holds is not None else None
                if top is not None:  # the exact norm and vector: the gap closes at once
                    upper, best = top
                    v = best.to(dtype=v.dtype).view_as(v)
                    wv = self._op(v)
                    sigma = self._estimate(v)
                else:  # too large for the exact norm: a safe bound
                    upper = self.certified_norm()
                continue
            if upper is None:
                upper = self.certified_norm()
                assert upper is not None
            if float(upper) - float(sigma) <= atol + rtol * float(upper):
                break
            it += 1
            v, wv, sigma = self._power_step(v, wv)
        if upper is None:
            upper = self.certified_norm()
            assert upper is not None
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        return upper, it

    def _dims(self) -> tuple[int, int]:
        """``(n_in, n_out)`` of the operator."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """The generic hook of :func:`resflow.layers.base.after_optimizer_step`:
        :meth:`certify` in eval mode and every ``certify_every`` training steps,
        else :meth:`refresh`."""
        if self._count_step_certifies():
            self.certify()
        else:
            self.refresh()

    def _count_step_certifies(self) -> bool:
        """Count a training step (in training mode); whether this use certifies."""
        if self.training:
            self.steps += 1
        return not self.training or int(self.steps) % self.certify_every == 0

    @classmethod
    def after_optimizer_step_all(cls, layers: list[LipschitzLayer]) -> None:
        """:meth:`after_optimizer_step` of every layer, the refreshes and certificates of
        equal dense layers batched (:func:`refresh_all`, :func:`certify_all`)."""
        due = [m._count_step_certifies() for m in layers]
        certify_all([m for m, certify in zip(layers, due) if certify])
        refresh_all([m for m, certify in zip(layers, due) if not certify])

    @classmethod
    @contextmanager
    def shared_scope(cls, layers: list[LipschitzLayer]) -> Iterator[None]:
        """Inside, equal dense layers (see :func:`refresh_all`) share one batched
        computation of their rescaled weights: :meth:`constrained_weight` returns it
        under ``no_grad`` and when asked for it (``shared=True``, by the residual
        branch's closed-form gradient, whose backward then reaches every layer's
        weight through one batched backward)."""
        groups = _groups(layers)
        grad = torch.is_grad_enabled()
        try:
            for group in groups:
                for m in group:  # computed on the first request (the fused 2-D path has none)
                    m._shared_group = (group, grad)
            yield
        finally:
            for group in groups:
                for m in group:
                    m._shared_weight = m._shared_group = None

    def transient_state(self) -> tuple[Tensor, ...]:
        """The norm state (see :func:`resflow.layers.base.preserved_transient_state`)."""
        return (self.v.clone(), self.sigma.clone(), self.ratio.clone(), self.upper.clone(),
                self.steps.clone())  # fmt: skip

    def load_transient_state(self, state: tuple[Tensor, ...]) -> None:
        self.v = state[0]
        for buf, value in zip((self.sigma, self.ratio, self.upper, self.steps), state[1:]):
            buf.copy_(value)

    def _closed_form_norm(self) -> Tensor | None:
        return closed_form_norm(self.weight, self.domain, self.codomain)

    def operator_norm(self) -> Tensor:
        """Differentiable norm: the closed form where one exists, else
        ``r ||W v||_q / ||v||_p`` at the stored power-iteration vector ``v`` (the
        certified bound right after :meth:`certify`)."""
        closed = self._closed_form_norm()
        if closed is not None:
            return closed
        return self.ratio * self._estimate(self.v)

    def constrained_weight(self, shared: bool = False) -> Tensor:
        """``W / max(1, sigma / c)`` (see :meth:`shared_scope` for ``shared``)."""
        scope = self._shared_group
        if scope is not None and (shared or not torch.is_grad_enabled()):
            if self._shared_weight is None:  # the group's first request in this scope
                group, grad = scope
                with torch.set_grad_enabled(grad):
                    for m, wm in zip(group, _rescaled(group).unbind(0)):
                        m._shared_weight = wm
            w = self._shared_weight
            if not torch.is_grad_enabled() or w.requires_grad == self.weight.requires_grad:
                return w
        sigma = self.operator_norm()
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def extra_repr(self) -> str:
        def show(p: Order) -> str:
            return "learned" if isinstance(p, NormOrder) else str(p)

        return (
            f"{super().extra_repr()}, coeff={self.coeff}, "
            f"domain={show(self.domain)}, codomain={show(self.codomain)}"
        )


class LipschitzLinear(LipschitzLayer, nn.Linear):
    """Linear layer with ``||W||_{p->q} <= coeff`` (spectral norm when p = q = 2)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.98,
        domain: Order = 2.0,
        codomain: Order = 2.0,
        atol: float = 1e-3,
        rtol: float = 1e-3,
        max_iter: int = 200,
        init_iter: int = 200,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_lipschitz(coeff, domain, codomain, atol, rtol, max_iter, init_iter)
        v = torch.randn(1, in_features)
        self.register_buffer("v", v / v.norm())
        self.certify(max_iter=init_iter)

    def _op(self, v: Tensor) -> Tensor:
        return F.linear(v, self.weight)

    def _facts(self, w: Tensor) -> OperatorFacts:
        return dense_facts(w)

    def _spectral_bound(self, w: Tensor, guess: float | None) -> Tensor:
        return spectral_norm(w, guess)

    def _top_singular(self) -> tuple[Tensor, Tensor] | None:
        return top_singular_vector(self.weight)

    def _bound_holds(self, guess: float) -> bool | None:
        return spectral_bound_holds(self.weight, guess)

    def _dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _op_t(self, u: Tensor) -> Tensor:
        return F.linear(u, self.weight.t())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.constrained_weight(), self.bias)


class LipschitzConv2d(LipschitzLayer, nn.Conv2d):
    """2-D convolution (stride 1, 'same' padding) with operator norm ``<= coeff``.

    The power-iteration vector has the shape of one input image; it is created on the
    first forward pass (and resized when a checkpoint is loaded).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        coeff: float = 0.98,
        domain: Order = 2.0,
        codomain: Order = 2.0,
        atol: float = 1e-3,
        rtol: float = 1e-3,
        max_iter: int = 200,
        init_iter: int = 200,
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias
        )
        self._init_lipschitz(coeff, domain, codomain, atol, rtol, max_iter, init_iter)
        self.register_buffer("v", torch.empty(0))

    def _op(self, v: Tensor) -> Tensor:
        return conv2d(v, self.weight, None, self.padding)

    def _op_t(self, u: Tensor) -> Tensor:
        return conv2d_adjoint(u, self.weight, self.padding, self.v.shape)

    def _facts(self, w: Tensor) -> OperatorFacts:
        return conv_facts(w, self._size(), self._pad())

    def _spectral_bound(self, w: Tensor, guess: float | None) -> Tensor:
        return conv_spectral_norm(w, self._size(), self._pad(), guess=guess).value

    def _top_singular(self) -> tuple[Tensor, Tensor] | None:
        return top_singular_vector(self.weight, self._size(), self._pad())

    def _bound_holds(self, guess: float) -> bool | None:
        return spectral_bound_holds(self.weight, guess, self._size(), self._pad())

    def _size(self) -> tuple[int, int]:
        return int(self.v.shape[2]), int(self.v.shape[3])

    def _pad(self) -> tuple[int, int]:
        return int(self.padding[0]), int(self.padding[1])

    def _dims(self) -> tuple[int, int]:
        n = self.v.shape[2] * self.v.shape[3]
        return self.in_channels * n, self.out_channels * n

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "v"
        if key in state_dict and state_dict[key].shape != self.v.shape:
            self.v = torch.empty_like(state_dict[key], device=self.v.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        self.prepare(x)
        return conv2d(x, self.constrained_weight(), self.bias, self.padding)

    def prepare(self, x: Tensor) -> None:
        """Check the input shape; on first use create the power-iteration vector."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        shape = (1, *x.shape[1:])
        if self.v.shape != shape:
            if self.v.numel() != 0:
                raise ValueError(
                    f"input size {tuple(x.shape[1:])} differs from the size "
                    f"{tuple(self.v.shape[1:])} this layer's norm was estimated for"
                )
            v = torch.randn(shape, device=x.device, dtype=x.dtype)
            self.v = v / v.norm()
            self.certify(max_iter=self.init_iter)


# Convolutions from or to at most this many channels run as one matrix product over
# unfolded patches: oneDNN's direct kernels reach a small fraction of the matrix units
# there (64x1x28x28 -> 512 channels, 3x3: 2x faster as a product, the adjoint 4x).
_FEW_CHANNELS = 4


def _few(shape: torch.Size | tuple[int, ...], padding: tuple[int, ...]) -> str:
    """Which side of a square k x k (k > 1) kernel of ``shape`` has few channels ("in",
    "out"), or "" where the convolution is left to torch (1x1, unequal or too much
    padding: ``fold`` needs ``padding <= k - 1``)."""
    k = shape[-1]
    if k == 1 or shape[-2] != k or padding[0] != padding[1] or padding[0] > k - 1:
        return ""
    if shape[1] <= _FEW_CHANNELS:
        return "in"
    return "out" if shape[0] <= _FEW_CHANNELS else ""


def _patch_index(c: int, h: int, w: int, k: int, p: int, device: torch.device) -> Tensor:
    """For ``x`` of shape ``(b, c, h, w)`` zero-padded by ``p`` and flattened per sample,
    the positions of its ``k x k`` patches in ``F.unfold``'s order (``(c, ky, kx)`` rows,
    output positions as columns), flattened; cached per shape and device."""
    key = (c, h, w, k, p, str(device))
    idx = _PATCH_INDEX.get(key)
    if idx is None:
        hp, wp = h + 2 * p, w + 2 * p
        ho, wo = hp - k + 1, wp - k + 1
        ar = torch.arange
        idx = (
            ar(c).view(c, 1, 1, 1, 1) * (hp * wp)
            + (ar(ho).view(1, 1, 1, ho, 1) + ar(k).view(1, k, 1, 1, 1)) * wp
            + ar(wo).view(1, 1, 1, 1, wo)
            + ar(k).view(1, 1, k, 1, 1)
        ).reshape(-1)
        idx = idx.to(device)
        if len(_PATCH_INDEX) > 256:
            _PATCH_INDEX.clear()
        _PATCH_INDEX[key] = idx
    return idx


_PATCH_INDEX: dict[tuple[int | str, ...], Tensor] = {}


def unfold(x: Tensor, k: int, p: int) -> Tensor:
    """``unfold(x, k, p)`` as one gather from the padded input (2-4x faster on
    a CPU at the sizes of the residual blocks' few-channel convolutions)."""
    b, c, h, w = x.shape
    flat = F.pad(x, (p, p, p, p)).reshape(b, -1)
    cols = torch.index_select(flat, 1, _patch_index(c, h, w, k, p, x.device))
    return cols.view(b, c * k * k, -1)


def fold(cols: Tensor, size: tuple[int, int], k: int, p: int) -> Tensor:
    """``F.fold(cols, size, k, padding=p)``, the adjoint of :func:`unfold`: one
    scatter-add into the padded output, then the crop."""
    b = cols.shape[0]
    h, w = size
    c = cols.shape[1] // (k * k)
    hp, wp = h + 2 * p, w + 2 * p
    out = cols.new_zeros(b, c * hp * wp)
    out.index_add_(1, _patch_index(c, h, w, k, p, cols.device), cols.reshape(b, -1))
    return out.view(b, c, hp, wp)[:, :, p : p + h, p : p + w]


def _flipped_taps(y: Tensor, o: int, kk: int) -> Tensor:
    """``y`` of shape ``(b, o * kk, L)`` with its kernel-tap axis reversed."""
    b, _, n = y.shape
    return y.view(b, o, kk, n).flip(2).reshape(b, o * kk, n)


def _taps_weight(w: Tensor) -> Tensor:
    """``w`` (o, c, k, k) as the ``(o * k * k, c)`` matrix of its taps."""
    o, c, k, _ = w.shape
    return w.permute(0, 2, 3, 1).reshape(o * k * k, c)


def conv2d(x: Tensor, w: Tensor, bias: Tensor | None, padding: tuple[int, ...]) -> Tensor:
    """``F.conv2d`` (stride 1), with 1x1 kernels as one batched matrix product, and
    kernels from or to few channels as a product over unfolded patches (faster on CPU):
    few inputs, ``W (o, c k k) @ unfold(x)``; few outputs, the taps ``W' (o k k, c) @ x``
    summed back by ``fold`` with the kernel flipped (``fold`` is ``unfold``'s adjoint)."""
    b, c, h, wd = x.shape
    o, k = w.shape[0], w.shape[-1]
    few = _few(w.shape, padding)
    if w.shape[-1] == 1 and w.shape[-2] == 1:
        y = torch.matmul(w.view(o, c), x.reshape(b, c, h * wd)).view(b, -1, h, wd)
    elif few:
        p = padding[0]
        ho, wo = h + 2 * p - k + 1, wd + 2 * p - k + 1
        if few == "in":
            y = torch.matmul(w.reshape(o, -1), unfold(x, k, p)).view(b, o, ho, wo)
        else:
            taps = torch.matmul(_taps_weight(w), x.reshape(b, c, h * wd))
            y = fold(_flipped_taps(taps, o, k * k), (ho, wo), k, k - 1 - p)
    else:
        return F.conv2d(x, w, bias, padding=padding)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv2d_adjoint(
    u: Tensor, w: Tensor, padding: tuple[int, ...], in_shape: torch.Size | tuple[int, ...]
) -> Tensor:
    """The adjoint of :func:`conv2d` (no bias) applied to ``u``, for inputs shaped like
    ``in_shape`` (batch taken from ``u``): the transposes of :func:`conv2d`'s matrix
    products where it uses them, else the kernel autograd uses for convolution input
    gradients."""
    b, o = u.shape[:2]
    c, k = w.shape[1], w.shape[-1]
    if w.shape[-1] == 1 and w.shape[-2] == 1:
        h, wd = u.shape[-2:]
        return torch.matmul(w.view(o, c).t(), u.reshape(b, o, h * wd)).view(b, -1, h, wd)
    few = _few(w.shape, padding)
    if few:
        p, (h, wd) = padding[0], in_shape[-2:]
        if few == "in":
            cols = torch.matmul(w.reshape(o, -1).t(), u.reshape(b, o, -1))
            return fold(cols, (h, wd), k, p)
        cols = _flipped_taps(unfold(u, k, k - 1 - p), o, k * k)
        return torch.matmul(_taps_weight(w).t(), cols).view(b, c, h, wd)
    shape = (u.shape[0], *in_shape[1:])
    return torch.nn.grad.conv2d_input(shape, w, u, padding=padding)


def conv2d_weight(
    x: Tensor, shape: torch.Size | tuple[int, ...], cot: Tensor, padding: tuple[int, ...]
) -> Tensor:
    """``sum_b`` of the weight gradient of :func:`conv2d` at input ``x`` for the output
    cotangent ``cot`` (``torch.nn.grad.conv2d_weight``, with :func:`conv2d`'s matrix
    products where it uses them)."""
    o, c, k = shape[0], shape[1], shape[-1]
    b = x.shape[0]
    few = _few(shape, padding)
    if few:
        p = padding[0]
        if few == "in":
            cols = unfold(x, k, p)
            return (cot.reshape(b, o, -1) @ cols.transpose(1, 2)).sum(0).view(shape)
        cols = _flipped_taps(unfold(cot, k, k - 1 - p), o, k * k)
        g = (cols @ x.reshape(b, c, -1).transpose(1, 2)).sum(0)
        return g.view(o, k, k, c).permute(0, 3, 1, 2).contiguous()
    return torch.nn.grad.conv2d_weight(x, shape, cot, padding=padding)


def spectral_dense(m: nn.Module) -> TypeGuard[LipschitzLinear]:
    """Whether ``m`` is a dense layer under the spectral norm (``p = q = 2``, fixed):
    its ``sigma`` is ``r ||W v||_2 / ||v||_2``."""
    return (
        isinstance(m, LipschitzLinear)
        and not isinstance(m.domain, NormOrder)
        and not isinstance(m.codomain, NormOrder)
        and float(m.domain) == 2.0
        and float(m.codomain) == 2.0
    )


def _groups(layers: list[LipschitzLayer]) -> list[list[LipschitzLinear]]:
    """The layers whose norm work can be batched, in groups of two or more: dense,
    spectral norm (:func:`spectral_dense`), equal weight shape, dtype and device."""
    groups: dict[tuple[object, ...], list[LipschitzLinear]] = {}
    for m in layers:
        if spectral_dense(m):
            key = (tuple(m.weight.shape), m.weight.dtype, m.weight.device)
            groups.setdefault(key, []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def _rescaled(group: list[LipschitzLinear]) -> Tensor:
    """The stacked ``W / max(1, sigma / c)`` of a group, as :meth:`constrained_weight`
    computes each (in the weights' precision, also under autocast)."""
    w = torch.stack([m.weight for m in group])
    with torch.autocast(w.device.type, enabled=False):
        v = torch.cat([m.v for m in group])
        ratio = torch.stack([m.ratio for m in group])
        coeff = w.new_tensor([m.coeff for m in group])
        sigma = ratio * _estimates(w, v)[1]
        return w / torch.clamp(sigma / coeff, min=1.0)[:, None, None]


@torch.no_grad()
def refresh_all(
    layers: list[LipschitzLayer],
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
) -> int:
    """:meth:`LipschitzLayer.refresh` of every layer; returns the largest iteration
    count. Dense spectral-norm layers of equal shape run their power iterations
    together, one batched product per step for the whole group, each layer stopping
    on its own criterion (the same iterates as one at a time)."""
    return _per_group(
        layers,
        lambda m: m.refresh(atol=atol, rtol=rtol, max_iter=max_iter),
        lambda group: _refresh_group(group, atol, rtol, max_iter),
        lambda group: [group],
    )


def _per_group(
    layers: list[LipschitzLayer],
    one: Callable[[LipschitzLayer], int],
    batched: Callable[[list[LipschitzLinear]], int],
    parts: Callable[[list[LipschitzLinear]], list[list[LipschitzLinear]]],
) -> int:
    """``one`` on every layer outside a group (:func:`_groups`), ``batched`` on every
    part of every group; the largest iteration count."""
    groups = _groups(layers)
    grouped = {id(m) for g in groups for m in g}
    most = max((one(m) for m in layers if id(m) not in grouped), default=0)
    for group in groups:
        for part in parts(group):
            most = max(most, batched(part))
    return most


def _unit(x: Tensor) -> Tensor:
    """Each row of ``x`` over its 2-norm (as ``_dual(x, 2)`` per layer)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)


def _estimates(w: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(W v, ||W v|| / ||v||)`` for stacked weights ``[n, out, in]`` and vectors."""
    wv = torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)
    norm_v = torch.linalg.vector_norm(v, dim=1).clamp_min(1e-30)
    return wv, torch.linalg.vector_norm(wv, dim=1) / norm_v


def _power_steps(w: Tensor, wv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One power-iteration step of every stacked layer (``_power_step`` per layer)."""
    v = _unit(torch.bmm(_unit(wv).unsqueeze(1), w).squeeze(1))
    return (v, *_estimates(w, v))


def _refresh_group(
    group: list[LipschitzLinear], atol: float | None, rtol: float | None, max_iter: int | None
) -> int:
    out_v = torch.cat([m.v for m in group])  # [n, in]
    out_sigma = torch.stack([m.sigma for m in group])
    # after a training step most layers settle in two steps while a few with close
    # singular values take tens (the 2-D paper model's 300 layers: up to 30), so the
    # stack shrinks to the running layers whenever half of it has stopped (stopped
    # layers still in it iterate on, unread); ``rows`` are the stack's places in the group
    limits = [m.max_iter if max_iter is None else max_iter for m in group]
    live = [i for i, n in enumerate(limits) if n > 0]
    if not live:  # no iterations allowed: nothing changes
        return 0
    rows = torch.tensor(live, dtype=torch.long, device=out_v.device)
    w = torch.stack([group[i].weight for i in live])
    v, sigma = out_v[rows], out_sigma[rows]

    def each(given: float | None, name: str) -> Tensor:
        """The running layers' ``name`` (or ``given``), in float64 as refresh() uses it."""
        return w.new_tensor(
            [getattr(group[i], name) if given is None else given for i in live], dtype=torch.float64
        )

    tol_a, tol_r, limit = each(atol, "atol"), each(rtol, "rtol"), each(max_iter, "max_iter")
    active = torch.ones_like(rows, dtype=torch.bool)
    wv = torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)
    it, running = 0, len(live)
    while running:
        it += 1
        v, wv, sigma_new = _power_steps(w, wv)
        done = (sigma_new - sigma).abs().double() <= tol_a + tol_r * sigma_new.double()
        sigma = sigma_new
        stop = active & (done | (limit <= it))
        stopped = int(stop.sum())
        if stopped:
            out_v[rows[stop]], out_sigma[rows[stop]] = v[stop], sigma[stop]
            active, running = active & ~stop, running - stopped
            if running and 2 * running <= len(rows):
                rows, w, v, wv, sigma = (
                    rows[active],
                    w[active],
                    v[active],
                    wv[active],
                    sigma[active],
                )
                tol_a, tol_r, limit = tol_a[active], tol_r[active], limit[active]
                active = active[active]
    for i, m in enumerate(group):
        m.v.copy_(out_v[i : i + 1])
        m.sigma.copy_(out_sigma[i])
    return it


@torch.no_grad()
def certify_all(
    layers: list[LipschitzLayer],
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
) -> int:
    """:meth:`LipschitzLayer.certify` of every layer; returns the largest iteration
    count. Dense spectral-norm layers of equal shape settle their power iterations
    together (each on its own criterion, as in :func:`refresh_all`) and take the
    Cholesky test of their bounds in one batched factorization; a layer the batched
    test leaves open (its bound not confirmed, a zero weight or a null-space vector)
    is certified on its own from where it started."""
    return _per_group(
        layers,
        lambda m: m.certify(atol=atol, rtol=rtol, max_iter=max_iter),
        lambda group: _certify_group(group, atol, rtol, max_iter),
        _chunks,
    )


def _chunks(group: list[LipschitzLinear]) -> list[list[LipschitzLinear]]:
    """A group in parts of at most :data:`CPU_CHUNK` layers on the CPU, where their
    float64 Gram matrices then stay in cache (certificates of the 2-D paper model's 300
    equal layers: 0.32 s whole, 0.19 s in parts of 16, 0.29 s one at a time; the
    power-iteration refresh gains nothing from parts); whole on an accelerator, where
    each operation and each read of the device costs more than the arithmetic."""
    if group[0].weight.device.type != "cpu":
        return [group]
    return [group[k : k + CPU_CHUNK] for k in range(0, len(group), CPU_CHUNK)]


CPU_CHUNK = 16


def _certify_group(
    group: list[LipschitzLinear], atol: float | None, rtol: float | None, max_iter: int | None
) -> int:
    """:func:`certify_all` for one group (see :meth:`LipschitzLayer.certify` and
    :meth:`LipschitzLayer._gap_closing_power_iteration`, whose quick path this is)."""
    if min(group[0].weight.shape) > EXACT_LIMIT:  # no exact test: each on its own
        return max(m.certify(atol=atol, rtol=rtol, max_iter=max_iter) for m in group)
    w = torch.stack([m.weight.detach() for m in group])  # [n, out, in]
    eps = torch.finfo(w.dtype).eps
    tol_r = w.new_tensor(
        [max(m.rtol if rtol is None else rtol, 64 * eps + 4e-8) for m in group],
        dtype=torch.float64,
    )
    limit = w.new_tensor([m.max_iter if max_iter is None else max_iter for m in group])
    v = torch.cat([m.v for m in group])  # [n, in]
    wv, sigma = _estimates(w, v)
    # the cases certify() treats apart go there: a zero weight, v in the null space, no
    # iterations allowed
    apart = (w.abs().amax((1, 2)) == 0) | (sigma <= 0) | (limit <= 0)
    iters = torch.zeros_like(limit)
    # settle: each layer until its estimate moves < rtol / 4; the products run on the
    # layers still settling only (a slow one would otherwise keep the whole part busy)
    work = (~apart).nonzero().squeeze(1)
    w_work, prev = w[work], sigma.double()
    while work.numel():
        iters[work] += 1
        v_new, wv_new, new = _power_steps(w_work, wv[work])
        v[work], wv[work], sigma[work] = v_new, wv_new, new
        moved = (new.double() - prev[work]).abs()
        prev[work] = new.double()
        going = (moved > 0.25 * tol_r[work] * new.double()) & (iters[work] < limit[work])
        if not bool(going.all()):
            work, w_work = work[going], w_work[going]
    guess = sigma.double() * (1.0 + tol_r)
    m64 = w.double()
    gram = m64.mT @ m64 if w.shape[-1] <= w.shape[-2] else m64 @ m64.mT
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=w.device)
    with one_thread():
        info = torch.linalg.cholesky_ex(guess[:, None, None] ** 2 * eye - gram)[1]
    holds = (info == 0) & ~apart
    _, est = _estimates(w, v)
    margin = rounding_margin(w.dtype, min(w.shape[-2:]))
    upper = guess * (1.0 + MARGIN)
    ratio = torch.where(est > 0, upper * (1.0 + margin) / est.double(), 1.0).clamp_min(1.0)
    most = 0
    flags, aside, counts = holds.tolist(), apart.tolist(), iters.tolist()
    for i, m in enumerate(group):
        if flags[i]:
            m.v.copy_(v[i : i + 1])
            m.sigma.copy_(sigma[i])
            m.upper.copy_(upper[i])
            m.ratio.fill_(float(ratio[i]))
            it = int(counts[i])
        elif aside[i]:  # from its own start, on its own
            it = m.certify(atol=atol, rtol=rtol, max_iter=max_iter)
        else:  # not confirmed: on its own from the settled state
            state = (v[i : i + 1], wv[i : i + 1], sigma[i], int(counts[i]))
            it = m.certify(atol=atol, rtol=rtol, max_iter=max_iter, settled=state)
        most = max(most, it)
    return most


@torch.no_grad()
def refresh_lipschitz(
    model: nn.Module,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
    certified: bool = True,
) -> int:
    """Certify (:meth:`LipschitzLayer.certify`) every Lipschitz layer in ``model``, or
    with ``certified=False`` only run the power iteration (:meth:`LipschitzLayer.refresh`);
    returns the largest iteration count.

    After it, every layer satisfies ``||W / max(1, sigma / c)||_{p->q} <= c`` (with
    ``certified=True``) until its weight changes.
    """
    layers = [m for m in model.modules() if isinstance(m, LipschitzLayer)]
    if not certified:
        return refresh_all(layers, atol, rtol, max_iter)
    return certify_all(layers, atol, rtol, max_iter)


def set_certify_every(model: nn.Module, every: int) -> None:
    """Certify the Lipschitz layers of ``model`` every ``every`` training steps (and
    at every use in eval mode); between certificates only the power iteration runs."""
    if every < 1:
        raise ValueError(f"certify_every must be >= 1, got {every}")
    for m in model.modules():
        if isinstance(m, LipschitzLayer):
            m.certify_every = every


def preserved_norm_state(model: nn.Module) -> AbstractContextManager[None]:
    """Restore every norm estimate (vectors and sigma) on exit (an alias of
    :func:`resflow.layers.base.preserved_transient_state`)."""
    return preserved_transient_state(model)
