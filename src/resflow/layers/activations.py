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


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "lipswish": LipSwish,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def make_activation(name: str) -> nn.Module:
    """A 1-Lipschitz activation by name: ``lipswish`` (default), ``elu`` or ``softplus``."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None
