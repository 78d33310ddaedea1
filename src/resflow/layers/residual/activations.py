"""Lipschitz activations for residual branches (Residual Flows, Chen et al. 2019, §3.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.residual.kernels import fusable


class LipSwish(nn.Module):
    """``LipSwish(z) = z * sigmoid(beta * z) / 1.1`` with ``beta = softplus(b)`` learned.

    Swish's derivative is bounded by about 1.1 for every ``beta > 0``, so dividing by
    1.1 makes it 1-Lipschitz; unlike ELU or softplus its second derivative does not
    vanish where the first saturates (no "saturation" of the Jacobian). As in the
    authors' implementation the raw parameter starts at ``b = 0.5``
    (``beta = softplus(0.5) ~ 0.974``); pass ``beta`` to start elsewhere.
    """

    def __init__(self, beta: float | None = None) -> None:
        super().__init__()
        if beta is not None and beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        b = 0.5 if beta is None else math.log(math.expm1(beta))
        self.b = nn.Parameter(torch.tensor(b))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.b)

    def forward(self, z: Tensor) -> Tensor:
        return z * torch.sigmoid(self.beta * z) / 1.1

    def derivative(self, z: Tensor) -> Tensor:
        """``d/dz LipSwish(z) = (s + u s') / 1.1`` with ``u = beta z``, ``s = sigmoid(u)``,
        ``s' = s (1 - s)``."""
        return self.value_and_derivatives(z, second=False)[1]

    def second_derivative(self, z: Tensor) -> Tensor:
        """``a'' = beta s' (2 + u (1 - 2 s)) / 1.1``."""
        return self.value_and_derivatives(z)[2]  # type: ignore[return-value]

    @torch.no_grad()
    def value_and_derivatives(
        self, z: Tensor, second: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(a(z), a'(z), a''(z))`` (``a''`` only with ``second``) sharing one sigmoid;
        one fused kernel when compilation is on (:mod:`resflow.layers.residual.kernels`)."""
        beta = self.beta.detach().to(z.dtype)
        if second:
            return _lipswish2(z, beta)  # type: ignore[no-any-return]
        a, d1 = _lipswish1(z, beta)
        return a, d1, None

    def param_chain(self) -> tuple[Tensor, Tensor]:
        """The differentiable ``beta`` and the raw parameter it comes from.

        LipSwish is ``a(z) = h(beta z) / beta`` with ``h(u) = u sigmoid(u) / 1.1``, so
        ``da/dbeta = (z a'(z) - a(z)) / beta`` and ``da'/dbeta = z a''(z) / beta``: the
        residual block's gradient pass gets ``dL/dbeta`` from products it forms anyway
        (:mod:`resflow.layers.residual.jacobian`)."""
        return self.beta, self.b


@fusable
def _lipswish1(z: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    u = z * beta
    s = torch.sigmoid(u)
    a = torch.mul(z, s).mul_(1 / 1.1)
    ds = torch.addcmul(s, s, s, value=-1.0)  # s' = s (1 - s)
    d1 = u.mul_(ds).add_(s).mul_(1 / 1.1)  # (s + u s') / 1.1
    return a, d1


@fusable
def _lipswish2(z: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u = z * beta
    s = torch.sigmoid(u)
    a = torch.mul(z, s).mul_(1 / 1.1)
    ds = torch.addcmul(s, s, s, value=-1.0)
    uds = u.mul_(ds)
    d1 = torch.add(s, uds).mul_(1 / 1.1)
    # a'' = beta (2 s' + u s' (1 - 2 s)) / 1.1
    d2 = torch.addcmul(ds.mul_(2.0), uds, s.mul_(-2.0).add_(1.0)).mul_(beta / 1.1)
    return a, d1, d2


#: ``(a, a', a'')`` of LipSwish at ``(z, beta)`` (fused while compilation is on; ``.fn``
#: is the plain function, for callers that compile a larger pass around it)
lipswish_derivatives = _lipswish2


class ELU(nn.ELU):
    """ELU (1-Lipschitz for ``alpha <= 1``) with its derivative, for fast Jacobian products."""

    def derivative(self, z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.ones_like(z), self.alpha * torch.exp(z))

    def second_derivative(self, z: Tensor) -> Tensor:
        return torch.where(z > 0, torch.zeros_like(z), self.alpha * torch.exp(z))


class Softplus(nn.Softplus):
    """Softplus (1-Lipschitz) with its derivative ``sigmoid(beta z)``."""

    def derivative(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.beta * z)

    def second_derivative(self, z: Tensor) -> Tensor:
        s = torch.sigmoid(self.beta * z)
        return self.beta * s * (1 - s)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "lipswish": LipSwish,
    "elu": ELU,
    "softplus": Softplus,
}


def make_activation(name: str) -> nn.Module:
    """A 1-Lipschitz activation by name: ``lipswish`` (default), ``elu`` or ``softplus``."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None
