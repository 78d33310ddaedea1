"""The invertible residual block ``f(x) = x + g(x)`` with ``Lip(g) < 1``.

Invertible by Banach's fixed-point theorem (i-ResNet, Behrmann et al. 2019); its
log-determinant is estimated by :mod:`resflow.layers.residual.logdet` (Residual Flows, Chen
et al. 2019).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer
from resflow.layers.residual import fused, jacobian
from resflow.layers.residual.in_forward import grad_in_forward
from resflow.layers.residual.jacobian import Linearization, linearize, neumann_branch
from resflow.layers.residual.logdet import (
    BLOCK_PATHS,
    EVAL_ESTIMATOR,
    TRAIN_ESTIMATOR,
    BlockPath,
    EstimatorConfig,
    LogdetEstimator,
    draw_terms,
    estimate_logdet,
    exact_pairs,
    neumann_pairs,
    series_from_jacobian,
)


class InverseNotConvergedError(RuntimeError):
    """The fixed-point iteration of a residual block's inverse did not converge."""


PLATEAU = 4
"""Iterations without a shrinking step that make a rounding plateau."""


@dataclass
class InverseInfo:
    """How a fixed-point inverse converged.

    Attributes:
        iterations: iterations used.
        final_step: the largest change in the last iteration.
        contraction: the contraction estimate ``rho`` used for the bound.
        error_bound: per sample, the a-posteriori bound on ``|x - x*|`` (the last step
            where the iteration ended on a rounding plateau).
        plateau: whether it ended on a rounding plateau.
    """

    iterations: int
    final_step: float
    contraction: float
    error_bound: Tensor
    plateau: bool


@runtime_checkable
class ContextBranch(Protocol):
    """A branch ``g(x; c)`` conditioned on a context of ``context_features`` features,
    contractive in ``x`` for every ``c`` (:class:`~resflow.nets.residual.ConditionedBranch`);
    a :class:`ResidualBlock` passes its context to such a branch only, on every call."""

    context_features: int

    def __call__(self, x: Tensor, context: Tensor) -> Tensor: ...


GENERAL_PATHS = ("in_forward", "autograd")  # the paths that take a ContextBranch


class _ImplicitGradient(torch.autograd.Function):
    """Identity in the forward pass; ``solve`` maps the incoming gradient in backward
    (unlike a tensor hook, it does not fire when the tensor is an ``autograd.grad``
    input, e.g. for the Jacobian of the block at the inverted point)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, solve: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.solve = solve
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.solve(grad), None


class ResidualBlock(FlowLayer):
    """``y = x + g(x)``; ``g`` must be contractive (built from Lipschitz layers).

    Args:
        g: the residual branch, e.g. :func:`resflow.nets.residual.residual_mlp`; a
            :class:`ContextBranch` ``g(x; c)`` is given the context of every call
            (``forward``, ``inverse`` and the implicit gradient of the inverse), which
            only the :data:`GENERAL_PATHS` pass to it.
        train_estimator: logdet estimator in training mode (default: 2 exact terms +
            Poisson(2) roulette, Neumann gradient, backward-in-forward).
        eval_estimator: logdet estimator in eval mode (default: the exact logdet for
            small blocks, else 20 exact terms + the unbiased tail).
        biased_estimator: a biased estimator whose figure is reported *beside* the true
            one (i-ResNet's truncated series, as its paper evaluates), never in its
            place; see :func:`evaluation_estimators`.
        geom_p: success probability of the geometric roulette distribution.
        poisson_lambda: rate of the Poisson roulette distribution.
        inverse_atol, inverse_rtol, inverse_max_iter: stopping rule of the fixed-point
            inverse ``x_{k+1} = y - g(x_k)``: all elements satisfy
            estimated error ``<= atol + rtol |x|`` (default 1e-6, 1e-10 in float64; see
            :meth:`fixed_point`); otherwise
            :class:`InverseNotConvergedError` is raised.
        path: how the forward pass computes ``g(x)``, the logdet and their gradients
            (:data:`~resflow.layers.residual.logdet.BlockPath`): ``"auto"`` (default)
            takes the fastest that applies (see :meth:`choose_path`); any other value
            forces that path, and a forward pass it cannot serve raises ``ValueError``.
            Every path gives the same numbers up to rounding.

    The roulette parameters are stored as (frozen) parameters of the block so that
    they travel with checkpoints, as in the reference implementation.
    """

    def __init__(
        self,
        g: nn.Module,
        train_estimator: LogdetEstimator = TRAIN_ESTIMATOR,
        eval_estimator: LogdetEstimator = EVAL_ESTIMATOR,
        biased_estimator: LogdetEstimator | None = None,
        geom_p: float = 0.5,
        poisson_lambda: float = 2.0,
        inverse_atol: float | None = None,
        inverse_rtol: float | None = None,
        inverse_max_iter: int = 1000,
        path: BlockPath = "auto",
    ) -> None:
        super().__init__()
        if path not in BLOCK_PATHS:
            raise ValueError(f"unknown block path {path!r}; use one of {BLOCK_PATHS}")
        if not 0.0 < geom_p < 1.0:
            raise ValueError(f"geom_p must be in (0, 1), got {geom_p}")
        if poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda must be positive, got {poisson_lambda}")
        self.g = g
        self.train_estimator = train_estimator
        self.eval_estimator = eval_estimator
        self.biased_estimator = biased_estimator
        self.geom_p = nn.Parameter(torch.tensor(geom_p), requires_grad=False)
        self.poisson_lambda = nn.Parameter(torch.tensor(poisson_lambda), requires_grad=False)
        self._roulette_key: tuple[int, ...] = ()
        self._roulette_values = (geom_p, poisson_lambda)
        self.inverse_atol = inverse_atol
        self.inverse_rtol = inverse_rtol
        self.inverse_max_iter = inverse_max_iter
        self.path: BlockPath = path
        # whether g takes a context, asked once (a protocol check costs microseconds)
        self.conditional = isinstance(g, ContextBranch)

    @classmethod
    def from_config(cls, g: nn.Module, config: EstimatorConfig) -> ResidualBlock:
        """A block with the estimators and roulette parameters of ``config``."""
        train, ev = config.estimators()
        return cls(
            g,
            train,
            ev,
            config.biased_estimator(),
            geom_p=config.geom_p,
            poisson_lambda=config.poisson_lambda,
            path=config.path,
        )

    def roulette(self) -> tuple[float, float]:
        """``(geom_p, poisson_lambda)`` as Python numbers, read from the (frozen) parameters
        only when they changed (loaded, assigned or modified in place): reading a tensor
        on a GPU waits for the device, and the blocks need these numbers every step."""
        p, lam = self.geom_p, self.poisson_lambda
        key = (id(p), p._version, id(lam), lam._version)
        if key != self._roulette_key:
            self._roulette_values = (float(p), float(lam))
            self._roulette_key = key
        return self._roulette_values

    @property
    def estimator(self) -> LogdetEstimator:
        """The estimator of the current mode (train or eval), as configured (``"auto"``
        is resolved per input by :meth:`estimator_for`)."""
        return self.train_estimator if self.training else self.eval_estimator

    def estimator_for(self, x: Tensor) -> LogdetEstimator:
        """The estimator of the current mode for the input ``x`` (``"auto"`` resolved by
        the dimension of one example)."""
        return self.estimator.resolve(x[0].numel())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = self._branch_context(context)
        if torch.is_autocast_enabled(x.device.type):
            # the power series cancels alternating terms: it keeps the weights' precision
            with torch.autocast(x.device.type, enabled=False):
                dtype = self.geom_p.dtype
                return self._forward(x.to(dtype), None if c is None else c.to(dtype))
        return self._forward(x, c)

    def _branch_context(self, context: Tensor | None) -> Tensor | None:
        """The context the branch takes: ``None`` for an unconditional branch (a context
        for other layers, e.g. a class-conditional prior's, is not its to use)."""
        if not self.conditional:
            return None
        if context is None:
            k = self.g.context_features
            raise ValueError(f"this block's branch is conditional: pass a context [batch, {k}]")
        return context

    def _g(self, x: Tensor, c: Tensor | None) -> Tensor:
        """``g(x)``, or ``g(x; c)`` for a conditional branch."""
        return self.g(x) if c is None else self.g(x, c)

    def _wants_grad(self, x: Tensor, c: Tensor | None = None) -> bool:
        """Whether this pass needs gradients (grad mode on and ``x``, the branch's
        context or a parameter of ``g`` requiring them)."""
        return torch.is_grad_enabled() and (
            x.requires_grad
            or (c is not None and c.requires_grad)
            or any(p.requires_grad for p in self.g.parameters())
        )

    def choose_path(self, x: Tensor, context: Tensor | None = None) -> BlockPath:
        """The path of a forward pass on ``x`` (with ``context``) now (mode, grad mode,
        estimator, branch).

        ``"auto"`` takes, without gradients, ``"graph_free"`` where ``g`` is a plain
        sequence of Lipschitz layers and activations with known derivatives
        (:func:`~resflow.layers.residual.jacobian.supported`), else ``"autograd"``
        (no graph kept). With gradients: ``"fused"`` for a small dense branch
        (:func:`~resflow.layers.residual.fused.supported`; any estimator, its own
        gradient); else, where the estimator computes them in the forward pass from a
        closed form (``grad_in_forward`` and the exact logdet or ``neumann_grad``),
        ``"closed_form"`` where ``g`` is supported; then ``"in_forward"`` where the
        estimator has ``grad_in_forward``; else ``"autograd"``. A conditional branch
        (:class:`ContextBranch`) takes one of the :data:`GENERAL_PATHS` only. A forced
        path is returned as it is, after checking that it applies; ``ValueError`` says
        why where it does not.
        """
        c = self._branch_context(context)
        est = self.estimator_for(x)
        wants_grad = self._wants_grad(x, c)
        if self.path == "auto":
            return self._auto_path(x, est, wants_grad)
        reason = self._why_not(self.path, x, est, wants_grad)
        if reason:
            raise ValueError(f"path={self.path!r} does not apply to this block: {reason}")
        return self.path

    def _auto_path(self, x: Tensor, est: LogdetEstimator, wants_grad: bool) -> BlockPath:
        if self.conditional:
            return "in_forward" if wants_grad and est.grad_in_forward else "autograd"
        if not wants_grad:
            return "graph_free" if jacobian.supported(self.g) else "autograd"
        if fused.supported(self.g, x):
            return "fused"
        if est.grad_in_forward and (est.method == "exact" or est.neumann_grad):
            if jacobian.supported(self.g):
                return "closed_form"
        return "in_forward" if est.grad_in_forward else "autograd"

    def _why_not(self, path: str, x: Tensor, est: LogdetEstimator, wants_grad: bool) -> str:
        """Why ``path`` cannot serve this pass (``""`` where it can)."""
        if self.conditional and path not in GENERAL_PATHS:
            return (
                "the branch takes a context, which only the general paths "
                f"({', '.join(map(repr, GENERAL_PATHS))}) pass to it"
            )
        if path == "fused":
            if not fused.supported(self.g, x):
                return (
                    "it needs dense spectral-norm layers with bias alternating with LipSwish "
                    f"on inputs [batch, d <= {fused.MAX_DIM}]"
                )
        if path in ("closed_form", "graph_free") and not jacobian.supported(self.g):
            return (
                "it needs g to be a sequence of Lipschitz layers and activations with known "
                "derivatives"
            )
        if path == "closed_form" and est.method != "exact" and not est.neumann_grad:
            return "its gradient is the Neumann series', the estimator has neumann_grad=False"
        if path == "graph_free" and wants_grad:
            return "it computes no gradients, and this pass needs them (use torch.no_grad())"
        return ""

    def _forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        est = self.estimator_for(x)
        path = self.choose_path(x, c)
        if path == "graph_free":
            with torch.no_grad():
                gx, lin = linearize(self.g, x)
            assert lin is not None
            p, lam = self.roulette()
            return x + gx, estimate_logdet(gx, x, est, p, lam, False, lin.vjp)
        if path == "fused":
            gx, logdet = fused.fused_branch(self.g, x, self._fused_head(est))  # type: ignore[arg-type]
        elif path == "closed_form":
            out = self._closed_form(x, est)
            assert out is not None
            gx, logdet = out
        elif path == "in_forward":
            # a context that requires grad gets its gradient as the parameters do
            extra = (c,) if c is not None and c.requires_grad else ()
            gx, logdet = grad_in_forward(self.g, lambda xd: self._run(xd, True, c), x, extra)
        elif not self._wants_grad(x, c):  # autograd, no graph kept
            with torch.enable_grad():
                xd = x.detach().requires_grad_(True)
                gx, logdet = self._run(xd, False, c)
            return x + gx.detach(), logdet.detach()
        else:  # autograd, backpropagated through the estimate
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            gx, logdet = self._run(xg, True, c)
        return x + gx, logdet

    def _run(self, x: Tensor, create_graph: bool, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(g(x), logdet)`` (``g(x; c)`` for a conditional branch) with autograd
        products; graphs to ``x``, ``c`` and the parameters when ``create_graph``."""
        if c is None:
            gx, lin = linearize(self.g, x)
        else:
            gx, lin = self.g(x, c), None
        p, lam = self.roulette()
        vjp = lin.vjp if lin is not None else None
        return gx, estimate_logdet(gx, x, self.estimator_for(x), p, lam, create_graph, vjp)

    def _fused_head(self, est: LogdetEstimator) -> fused.Head:
        """The logdet of the fused path from the explicit Jacobians: exact, or the
        series with this step's roulette draw (drawn here, as the other paths do)."""
        if est.method == "exact":
            return fused.exact_head
        n, weights = draw_terms(est.n_exact_terms, est.dist, *self.roulette())
        return functools.partial(series_from_jacobian, est=est, n_terms=n, weights=weights)

    def _closed_form(self, x: Tensor, est: LogdetEstimator) -> tuple[Tensor, Tensor] | None:
        """Backward-in-forward with the closed-form gradient of the exact logdet or of the
        Neumann series (:func:`~resflow.layers.residual.jacobian.neumann_branch`)."""
        if est.method == "exact":
            return neumann_branch(self.g, x, exact_pairs, 1.0)
        n, weights = draw_terms(est.n_exact_terms, est.dist, *self.roulette())

        def estimate(lin: Linearization, xd: Tensor) -> tuple[Tensor, list]:
            return neumann_pairs(lin.vjp, xd, est, n, weights)

        return neumann_branch(self.g, x, estimate, 1.0 / est.n_hutchinson)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        """``f^{-1}(y)`` by the fixed-point iteration of :meth:`fixed_point`.

        When gradients are needed (``y``, the branch's context or its parameters
        require them), the result is differentiated implicitly: ``x = y - g(x)`` gives
        ``dL/dy = w`` with ``w (I + J_g) = dL/dx``, solved by the fixed-point iteration
        ``w <- dL/dx - w J_g`` (a contraction, since ``Lip(g) < 1``), and
        ``dL/dtheta = -w dg/dtheta`` (likewise ``dL/dc = -w dg/dc`` for the context
        ``c`` of a conditional branch: the products are taken at ``g(x*; c)``).
        """
        c = self._branch_context(context)
        with torch.no_grad():
            x = self.fixed_point(y, context=c)
        assert isinstance(x, Tensor)
        return self._implicit(x, y, c) if self._wants_grad(y, c) else x

    def _implicit(self, x_star: Tensor, y: Tensor, c: Tensor | None = None) -> Tensor:
        x0 = x_star.detach().requires_grad_(True)
        gx = self._g(x0, c)  # the backward pass differentiates this graph, context included
        x = y - gx  # equals x_star; gradients are corrected by the hook below
        max_iter = self.inverse_max_iter
        rtol = max(self.tolerances(y.dtype)[1], 16 * torch.finfo(y.dtype).eps)

        def solve(grad: Tensor) -> Tensor:
            w, prev = grad, float("inf")
            scale = float(grad.detach().abs().max())
            for _ in range(max_iter):
                (wj,) = torch.autograd.grad(gx, x0, w, retain_graph=True)
                new = grad - wj
                step = float((new - w).detach().abs().max())
                w = new
                # converged, or stalled by rounding close to convergence
                if step <= rtol * scale or (step >= prev and step <= 1e3 * rtol * scale):
                    return w
                prev = step
            raise InverseNotConvergedError(
                f"the implicit gradient of the inverse did not converge in {max_iter} "
                "iterations; is Lip(g) < 1?"
            )

        return _ImplicitGradient.apply(x, solve)

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(atol, rtol)`` of the inverse: as given, else 1e-6 (1e-10 in float64)."""
        default = 1e-10 if dtype == torch.float64 else 1e-6
        atol = default if self.inverse_atol is None else self.inverse_atol
        rtol = default if self.inverse_rtol is None else self.inverse_rtol
        return atol, rtol

    @torch.no_grad()
    def fixed_point(
        self, y: Tensor, return_info: bool = False, context: Tensor | None = None
    ) -> Tensor | tuple[Tensor, InverseInfo]:
        """Fixed-point iteration ``x_{k+1} = y - g(x_k)`` (``g(x_k; c)`` for a
        conditional branch and its ``context`` ``c``) from ``x_0 = y``.

        Stopping rule, sound in float32, float64 and bfloat16:

        * the a-posteriori error bound of a contraction,
          ``|x_{k+1} - x*| <= rho / (1 - rho) |x_{k+1} - x_k|`` (``rho`` the ratio of
          successive steps), is below ``tol = max(atol + rtol |x|, floor)`` everywhere,
          where ``floor = 8 eps (|x| + |y|)`` is the rounding level of the dtype
          (``eps`` its machine epsilon) -- no iteration can get closer than that;
        * or the steps stop improving on the smallest so far for :data:`PLATEAU`
          iterations while they are within
          ``64 floor`` and the average contraction ``(step_k / step_1)^(1/k)`` is
          ``< 1``: a rounding plateau of a converged iteration.

        A true failure raises :class:`InverseNotConvergedError` saying what was measured:
        a non-finite iterate, steps that grow (the average contraction estimate is
        ``>= 1``: ``Lip(g) >= 1``), or no convergence within ``inverse_max_iter``.
        ``return_info=True`` also returns an :class:`InverseInfo`.
        """
        if not torch.isfinite(y).all():
            raise ValueError("the inverse got non-finite input (NaN or inf)")
        c = self._branch_context(context)
        eps = torch.finfo(y.dtype).eps
        atol, rtol = self.tolerances(y.dtype)
        x = y
        first = prev = best = math.inf
        stalled = 0
        rho_avg = math.nan
        info = None
        for k in range(1, self.inverse_max_iter + 1):
            x_new = y - self._g(x, c)
            if not torch.isfinite(x_new).all():
                raise InverseNotConvergedError(
                    f"the fixed-point inverse became non-finite at iteration {k} (average "
                    f"contraction estimate {rho_avg:.3g}): the iteration diverges, "
                    "Lip(g) >= 1"
                )
            delta = (x_new - x).abs()
            x = x_new
            step = float(delta.max())
            if k == 1:
                first = step
            elif first > 0:
                rho_avg = (step / first) ** (1.0 / (k - 1)) if step > 0 else 0.0
            floor = 8 * eps * (x.abs() + y.abs())
            tol = torch.maximum(atol + rtol * x.abs(), floor)
            rho = step / prev if 0.0 < prev < math.inf else 1.0  # 1: no estimate yet
            factor = rho / (1.0 - rho) if rho < 1.0 else math.inf
            bound = delta * factor
            if step < 0.999 * best:
                best, stalled = step, 0
            else:
                stalled += 1
            converged = step == 0.0 or bool((bound <= tol).all())
            plateau = stalled >= PLATEAU and rho_avg < 1.0 and bool((delta <= 64 * floor).all())
            if converged or plateau:
                if return_info:
                    err = bound if converged and step > 0 else delta
                    per_sample = err.flatten(1).max(1).values if err.dim() > 1 else err
                    info = InverseInfo(k, step, rho if rho < 1 else rho_avg, per_sample, plateau)
                    return x, info
                return x
            if k > 2 * PLATEAU and rho_avg >= 1.0 and step > 10 * first:
                raise InverseNotConvergedError(
                    f"the fixed-point inverse diverges: its steps grow (average contraction "
                    f"estimate {rho_avg:.3g} >= 1 after {k} iterations, last step {step:.3g}); "
                    "the block is not contractive, Lip(g) >= 1 -- call refresh_lipschitz, "
                    "or check the model with `resflow check`"
                )
            prev = step
        raise InverseNotConvergedError(
            f"the fixed-point inverse did not converge in {self.inverse_max_iter} iterations "
            f"(last step {prev:.3g}, average contraction estimate {rho_avg:.3g}, tolerance "
            f"atol={atol:g}, rtol={rtol:g}); "
            + (
                "the contraction is too weak to converge in time: raise inverse_max_iter"
                if rho_avg < 1.0
                else "the block is not contractive, Lip(g) >= 1"
            )
        )

    def extra_repr(self) -> str:
        biased = "" if self.biased_estimator is None else f", biased={self.biased_estimator}"
        path = "" if self.path == "auto" else f", path={self.path!r}"
        return f"train={self.train_estimator}, eval={self.eval_estimator}{biased}{path}"
