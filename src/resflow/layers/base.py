"""The layer contract shared by every invertible layer in resflow.

Every layer maps **data -> latent**:

* ``forward(x, context=None) -> (y, logdet)`` with ``logdet = log|det dy/dx|`` of
  shape ``[batch]``;
* ``inverse(y, context=None) -> x``.

A :class:`Sequential` of layers is itself a layer, so models are built by composition.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class FlowLayer(nn.Module):
    """Base class of an invertible layer (see the module docstring for the contract)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse")


def zero_logdet(x: Tensor) -> Tensor:
    """A per-sample zero log-determinant matching ``x``'s batch, dtype and device."""
    return x.new_zeros(x.shape[0])


class Sequential(FlowLayer):
    """Composition of flow layers: ``forward`` applies them in order and sums logdets."""

    def __init__(self, *layers: FlowLayer | Iterable[FlowLayer]) -> None:
        super().__init__()
        if len(layers) == 1 and not isinstance(layers[0], nn.Module):
            layers = tuple(layers[0])  # type: ignore[arg-type]
        self.layers = nn.ModuleList(layers)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> FlowLayer:
        return self.layers[i]  # type: ignore[return-value]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(x)
        for layer in self.layers:
            x, ld = layer(x, context)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y, context)
        return y


class Inverse(FlowLayer):
    """Swap the directions of a layer: ``forward`` runs ``layer.inverse``.

    The log-determinant of the inverse direction is minus the forward logdet at the
    inverted point, which costs one extra forward pass of the wrapped layer.
    """

    def __init__(self, layer: FlowLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.layer.inverse(x, context)
        _, logdet = self.layer(y, context)
        return y, -logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.layer(y, context)[0]


def check_finite(x: Tensor, name: str = "input") -> None:
    """Raise a clear ``ValueError`` when ``x`` holds NaN or infinite values."""
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")
