"""A Lipschitz-constrained layer's norm: its power iteration, its certificate and its
rescaled weight (:class:`LipschitzLayer`, the base of the dense and convolutional layers
of :mod:`resflow.layers.residual.lipschitz_layers`), and the model-wide entry points.

The weight is rescaled as ``W / max(1, sigma / c)`` where ``sigma`` bounds the induced
operator norm ``||W||_{p -> q}`` (``p`` = domain order, ``q`` = codomain order; both 2
gives the spectral norm of Miyato et al. 2018). For convolutions the norm is that of
the convolution *operator* on the actual input shape, not that of the reshaped kernel.

``sigma = r ||W v||_q / ||v||_p``: a power-iteration estimate at the persistent vector
``v`` (Behrmann et al. 2019; for ``p, q != 2`` the generalized power method of Residual
Flows, Chen et al. 2019, Appendix D), which is a *lower* bound on the norm, times a
correction ``r >= 1``. :meth:`LipschitzLayer.certify` sets ``r = u / estimate`` with
``u`` a certified *upper* bound (:mod:`resflow.layers.residual.spectral_bounds`,
:mod:`resflow.layers.residual.mixed_norms`), so that right after it ``sigma = u >=
||W||`` and the rescaled weight has ``||W / max(1, sigma / c)|| <= c``: a guarantee,
not an estimate. Its power iteration stops on the gap ``u - estimate``, not on the
change of the estimate.

:func:`refresh_lipschitz` certifies every layer; ``after_optimizer_step`` (called by the
training loop after every step and by evaluation, sampling and model loading before
use) certifies every ``certify_every`` training steps (default
:data:`CERTIFY_EVERY`; certifying costs more than a power-iteration step) and always
in eval mode, and otherwise runs the cheap power iteration (:meth:`LipschitzLayer.refresh`)
with the correction of the last certificate. Where the norm has a closed form (``q =
inf`` or ``p = 1``), it is used directly. Equal dense layers do this work together
(:mod:`resflow.layers.residual.refresh`).

>>> import torch
>>> from resflow.layers.residual.lipschitz_layers import LipschitzLinear
>>> layer = LipschitzLinear(4, 4, coeff=0.5)
>>> bool(torch.linalg.matrix_norm(layer.constrained_weight().detach(), ord=2) <= 0.5)
True
>>> layer.steps.item(), layer.certify_every == CERTIFY_EVERY
(0, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn

from resflow.layers.base import preserved_transient_state
from resflow.layers.residual.mixed_norms import (
    OperatorFacts,
    closed_form_norm,
    mixed_norm_bound,
)
from resflow.layers.residual.norms import NormOrder, Order, conjugate, dual, order_value, pnorm
from resflow.layers.residual.refresh import (
    certify_all,
    groups,
    refresh_all,
    rescaled_weights,
    settle,
)
from resflow.layers.residual.spectral_bounds import (
    MARGIN,
    one_thread,
    rounding_margin,
)

CERTIFY_EVERY = 10
"""Training steps between certificates (the power iteration runs in between; a
training loop also certifies before every checkpoint, and eval mode always does).
Its cost per step is measured in docs/RESULTS.md §9."""


class LipschitzLayer(nn.Module):
    """Shared machinery of the constrained layers: norm estimate, certificate, rescaling.

    Subclasses define ``_op(v)`` (the operator without bias, on a single domain
    element of shape ``[1, ...]``), ``_op_t(u)`` (its adjoint) and ``_facts(w)`` (the
    :class:`~resflow.layers.residual.mixed_norms.OperatorFacts` of weight ``w``).

    Where the induced norm has a closed form (``q = inf``: the largest ``p*``-norm of
    a row; ``p = 1``: the largest ``q``-norm of a column; for a convolution the rows
    and columns of its operator are the kernel's output and input slices), it is used
    exactly; otherwise ``sigma = r * estimate`` (see the module docstring).

    Buffers: ``v`` (power-iteration vector), ``sigma`` (the last estimate, a lower
    bound), ``ratio`` (``r``), ``upper`` (the last certified bound ``u``, 0 before the
    first certificate) and ``steps`` (training steps seen, for ``certify_every``).
    """

    #: power iterations of a refresh between certificates: 0 stops when the estimate
    #: settles (the rule read on the host once per run of iterations); ``k > 0`` runs exactly ``k``
    #: and reads nothing (the Residual Flows authors' ``--n-lipschitz-iters``).
    fixed_iter: int = 0
    #: the training-step count as last read or followed on the host (None: read it)
    _host_steps: int | None = None
    #: iterations of the last adaptive refresh: the first run of the next one (host only)
    _last_iters: int = 1

    dense_operator: ClassVar[bool] = False
    """Whether the operator is ``F.linear(v, weight)``: equal dense layers' norm work
    is then batched (:mod:`resflow.layers.residual.refresh`)."""
    conv_operator: ClassVar[bool] = False
    """Whether the operator is a stride-1 'same' convolution: equal convolutions'
    power iterations are then batched (:func:`~resflow.layers.residual.refresh.refresh_groups`)."""
    weight: Tensor
    v: Tensor
    _shared_weight: Tensor | None = None  # see shared_scope
    _shared_group: tuple[list[LipschitzLayer], bool] | None = None
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
        self._host_steps = None  # the loaded count is read at the next step
        for name in ("ratio", "upper", "steps"):  # checkpoints from before certificates
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _float_orders(self) -> tuple[float, float]:
        return float(order_value(self.domain)), float(order_value(self.codomain))

    def _power_step(self, v: Tensor, wv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step of the (generalized) power method from ``v`` (with ``wv = W v``):
        ``(v', W v', ||W v'||_q / ||v'||_p)``."""
        p, q = self._float_orders()
        v = dual(self._op_t(dual(wv, q)), conjugate(p))
        wv = self._op(v)
        return v, wv, pnorm(wv, q) / pnorm(v, p).clamp_min(1e-30)

    def _estimate(self, v: Tensor) -> Tensor:
        """``||W v||_q / ||v||_p`` exactly as :meth:`operator_norm` computes it."""
        p, q = order_value(self.domain), order_value(self.codomain)
        return pnorm(self._op(v), q) / pnorm(v, p).clamp_min(1e-30)

    @torch.no_grad()
    def refresh(
        self, atol: float | None = None, rtol: float | None = None, max_iter: int | None = None
    ) -> int:
        """The cheap update between certificates: power iteration until the estimate
        settles, ``|sigma_k - sigma_{k-1}| <= atol + rtol sigma_k``, or ``max_iter``
        iterations; the correction ``r`` of the last certificate is kept. Returns the
        iterations. This alone guarantees nothing (see :meth:`certify`)."""
        fixed = self.fixed_iter if atol is None and rtol is None and max_iter is None else 0
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        max_iter = self.max_iter if max_iter is None else max_iter
        closed = self._closed_form_norm()
        if closed is not None:
            self.sigma.copy_(closed)
            return 0
        if self.v.numel() == 0:
            return 0  # a convolution that has not seen an input yet
        v, sigma = self.v, self.sigma.clone()
        wv = self._op(v)
        if fixed:  # exactly ``fixed`` steps, no value read on the host
            for _ in range(fixed):
                v, wv, sigma = self._power_step(v, wv)
            self.v.copy_(v)
            self.sigma.copy_(sigma)
            return fixed
        v, sigma, it = settle(
            self._power_step, v, wv, sigma, atol, rtol, max_iter, self._last_iters
        )
        self._last_iters = it
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        return it

    @torch.no_grad()
    def certified_norm(
        self, weight: Tensor | None = None, guess: float | None = None
    ) -> Tensor | None:
        """A certified upper bound on ``||weight||_{p->q}`` (default: the raw weight),
        float64; exact for 2 -> 2 on operators that fit
        :data:`~resflow.layers.residual.spectral_bounds.EXACT_LIMIT` and for the pairs of
        :func:`~resflow.layers.residual.mixed_norms.is_exact_pair`; for 2 -> 2 a
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
        :func:`~resflow.layers.residual.spectral_bounds.spectral_norm`), then the exact
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
        quick = (float(order_value(self.domain)), float(order_value(self.codomain))) == (2.0, 2.0)
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
        """Count a training step (in training mode); whether this use certifies. The
        count is read on the host once and then followed there (``_host_steps``), so
        that the schedule costs no read of a device value per step."""
        if not self.training:
            return True
        self.steps += 1
        self._host_steps = int(self.steps) if self._host_steps is None else self._host_steps + 1
        return self._host_steps % self.certify_every == 0

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
        found = groups(layers)
        grad = torch.is_grad_enabled()
        try:
            for group in found:
                for m in group:  # computed on the first request (the fused 2-D path has none)
                    m._shared_group = (group, grad)
            yield
        finally:
            for group in found:
                for m in group:
                    m._shared_weight = m._shared_group = None

    def transient_state(self) -> tuple[Tensor, ...]:
        """The norm state (see :func:`resflow.layers.base.preserved_transient_state`)."""
        return (self.v.clone(), self.sigma.clone(), self.ratio.clone(), self.upper.clone(),
                self.steps.clone())  # fmt: skip

    def load_transient_state(self, state: tuple[Tensor, ...]) -> None:
        self._host_steps = None  # read again at the next step
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
                    for m, wm in zip(group, rescaled_weights(group).unbind(0)):
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


def set_power_iterations(model: nn.Module, iterations: int) -> None:
    """Refresh the Lipschitz layers of ``model`` between certificates with exactly
    ``iterations`` power iterations (``0``: until the estimate settles). Certificates
    are unchanged: they still iterate until the bound is certified."""
    if iterations < 0:
        raise ValueError(f"power_iterations must be >= 0, got {iterations}")
    for m in model.modules():
        if isinstance(m, LipschitzLayer):
            m.fixed_iter = iterations


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
