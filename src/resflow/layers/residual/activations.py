"""Lipschitz activations for residual branches (Residual Flows, Chen et al. 2019, §3.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        return self.derivatives(z, second=False)[0]

    def second_derivative(self, z: Tensor) -> Tensor:
        """``a'' = beta (2 s' + u s'') / 1.1`` with ``s'' = s' (1 - 2 s)``."""
        return self.derivatives(z)[1]

    def param_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(da/dbeta, da'/dbeta) = (z^2 s' / 1.1, (z / beta) a'')`` elementwise."""
        _, _, da, dd = self.derivatives(z)
        return da, dd

    @torch.no_grad()
    def derivatives(self, z: Tensor, second: bool = True) -> tuple[Tensor, ...]:
        """``a'``, and with ``second`` also ``a''``, ``da/dbeta``, ``da'/dbeta``, in few
        passes over ``z`` (these tensors are as large as the hidden activations)."""
        beta = self.beta.detach()
        u = z * beta
        s = torch.sigmoid(u)
        ds = s * (1 - s)
        uds = u.mul_(ds)  # u is not needed any more
        d1 = (s + uds).div_(1.1)
        if not second:
            return (d1,)
        q = torch.addcmul(ds.mul_(2), uds, s.mul_(-2).add_(1))  # 2 s' + u s' (1 - 2 s)
        da = uds.mul_(z).div_(1.1 * beta)  # z^2 s' / 1.1
        dd = q * z / 1.1
        d2 = q.mul_(beta / 1.1)
        return d1, d2, da, dd

    def param_chain(self) -> tuple[Tensor, Tensor]:
        """The differentiable ``beta`` and the raw parameter it comes from."""
        return self.beta, self.b


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
