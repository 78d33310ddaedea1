"""The invertible residual block ``f(x) = x + g(x)`` with ``Lip(g) < 1``.

Invertible by Banach's fixed-point theorem (i-ResNet, Behrmann et al. 2019); its
log-determinant is estimated by :mod:`resflow.layers.logdet` (Residual Flows, Chen
et al. 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer
from resflow.layers.logdet import (
    EVAL_ESTIMATOR,
    TRAIN_ESTIMATOR,
    LogdetEstimator,
    estimate_logdet,
    grad_in_forward,
)


class InverseNotConvergedError(RuntimeError):
    """The fixed-point iteration of a residual block's inverse did not converge."""


class ResidualBlock(FlowLayer):
    """``y = x + g(x)``; ``g`` must be contractive (built from Lipschitz layers).

    Args:
        g: the residual branch, e.g. :func:`resflow.models.nets.residual_mlp`.
        train_estimator: logdet estimator in training mode (default: 2 exact terms +
            Poisson(2) roulette, Neumann gradient, backward-in-forward).
        eval_estimator: logdet estimator in eval mode (default: 20 exact terms +
            unbiased tail).
        geom_p: success probability of the geometric roulette distribution.
        poisson_lambda: rate of the Poisson roulette distribution.
        inverse_atol, inverse_rtol, inverse_max_iter: stopping rule of the fixed-point
            inverse ``x_{k+1} = y - g(x_k)``: all elements satisfy
            ``|x_{k+1} - x_k| <= atol + rtol |x_{k+1}|``; otherwise
            :class:`InverseNotConvergedError` is raised.

    The roulette parameters are stored as (frozen) parameters of the block so that
    they travel with checkpoints, as in the reference implementation.
    """

    def __init__(
        self,
        g: nn.Module,
        train_estimator: LogdetEstimator = TRAIN_ESTIMATOR,
        eval_estimator: LogdetEstimator = EVAL_ESTIMATOR,
        geom_p: float = 0.5,
        poisson_lambda: float = 2.0,
        inverse_atol: float = 1e-5,
        inverse_rtol: float = 1e-5,
        inverse_max_iter: int = 1000,
    ) -> None:
        super().__init__()
        if not 0.0 < geom_p < 1.0:
            raise ValueError(f"geom_p must be in (0, 1), got {geom_p}")
        if poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda must be positive, got {poisson_lambda}")
        self.g = g
        self.train_estimator = train_estimator
        self.eval_estimator = eval_estimator
        self.geom_p = nn.Parameter(torch.tensor(geom_p), requires_grad=False)
        self.poisson_lambda = nn.Parameter(torch.tensor(poisson_lambda), requires_grad=False)
        self.inverse_atol = inverse_atol
        self.inverse_rtol = inverse_rtol
        self.inverse_max_iter = inverse_max_iter

    @property
    def estimator(self) -> LogdetEstimator:
        """The estimator of the current mode (train or eval)."""
        return self.train_estimator if self.training else self.eval_estimator

    def _logdet_fn(self, create_graph: bool):  # type: ignore[no-untyped-def]
        est = self.estimator
        p, lam = float(self.geom_p), float(self.poisson_lambda)

        def fn(gx: Tensor, x: Tensor) -> Tensor:
            return estimate_logdet(gx, x, est, p, lam, create_graph)

        return fn

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        est = self.estimator
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.g.parameters())
        )
        if not wants_grad:
            with torch.enable_grad():
                xd = x.detach().requires_grad_(True)
                gx = self.g(xd)
                logdet = self._logdet_fn(create_graph=False)(gx, xd)
            return x + gx.detach(), logdet.detach()
        if est.grad_in_forward and est.method == "series":
            gx, logdet = grad_in_forward(self.g, self._logdet_fn(create_graph=True), x)
            return x + gx, logdet
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        gx = self.g(xg)
        return x + gx, self._logdet_fn(create_graph=True)(gx, xg)

    @torch.no_grad()
    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        """Fixed-point iteration ``x_{k+1} = y - g(x_k)`` from ``x_0 = y``."""
        x = y
        delta = torch.full((), float("inf"))
        for _ in range(self.inverse_max_iter):
            x_new = y - self.g(x)
            delta = (x_new - x).abs()
            if not torch.isfinite(x_new).all():
                break
            x = x_new
            if bool((delta <= self.inverse_atol + self.inverse_rtol * x.abs()).all()):
                return x
        raise InverseNotConvergedError(
            f"fixed-point inverse did not converge in {self.inverse_max_iter} iterations "
            f"(largest last step {float(delta.max()):.3g}, atol={self.inverse_atol}, "
            f"rtol={self.inverse_rtol}); is Lip(g) < 1 (call refresh_lipschitz) and the "
            "input finite?"
        )

    def extra_repr(self) -> str:
        return f"train={self.train_estimator}, eval={self.eval_estimator}"
