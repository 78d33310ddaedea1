"""Bit reduction of 8-bit data (Glow; Residual Flows' 5-bit CelebA-HQ): the one place
where it is defined, used by the data loaders and by :class:`ReduceBits`."""

from __future__ import annotations

import torch
from torch import Tensor

from resflow.layers.base import FlowLayer, zero_logdet


def reduce_bits(x: Tensor, n_bits: int) -> Tensor:
    """Keep the ``n_bits`` most significant bits of 8-bit integers:
    ``floor(x / 2^(8 - n_bits))``, giving ``2^n_bits`` levels (a new tensor)."""
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
    step = 2 ** (8 - n_bits)
    if x.dtype == torch.uint8:
        return torch.bitwise_right_shift(x, 8 - n_bits)
    return torch.div(x, step, rounding_mode="floor")


class ReduceBits(FlowLayer):
    """:func:`reduce_bits` as a layer: a quantization, not a bijection (logdet 0); the
    bits/dim are those of the reduced data. ``inverse`` maps a level to the centre of
    its 8-bit bin."""

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        if not 1 <= n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
        self.n_bits = n_bits

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return reduce_bits(x, self.n_bits), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        step = 2 ** (8 - self.n_bits)
        return y * step + step // 2
