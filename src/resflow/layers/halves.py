"""Separate layers on the two halves of a split: ``(x_a, x_b) -> (f(x_a), g(x_b))``.

Flow++ (Ho et al. 2019) keeps its data as a pair of halves between couplings and
applies its normalization and 1x1 convolution to each half with its own parameters;
:class:`Halves` is that, for a :class:`~resflow.layers.coupling.ColumnMask` or a
:class:`~resflow.layers.coupling.ChannelMask`. The logdet is the sum of the two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resflow.layers.base import FlowLayer, Shape
from resflow.layers.coupling import ChannelMask, ColumnMask


class Halves(FlowLayer):
    """``y = join(first(x_a), second(x_b))`` for ``(x_a, x_b) = mask.split(x)``.

    Arguments:
        mask: a :class:`ColumnMask` or :class:`ChannelMask`.
        first, second: shape-preserving layers for ``x_a`` and ``x_b``.

    Example:
        >>> from resflow.layers.conv1x1 import InvertibleConv1x1
        >>> layer = Halves(ColumnMask(), InvertibleConv1x1(2), InvertibleConv1x1(2))
        >>> x = torch.randn(3, 2, 4, 4)
        >>> y, logdet = layer(x)
        >>> bool(torch.allclose(layer.inverse(y), x, atol=1e-5))
        True
    """

    def __init__(self, mask: ColumnMask | ChannelMask, first: FlowLayer, second: FlowLayer) -> None:
        super().__init__()
        if not isinstance(mask, (ColumnMask, ChannelMask)):
            raise TypeError(f"Halves needs a ColumnMask or a ChannelMask, got {mask!r}")
        self.mask = mask
        self.first = first
        self.second = second

    def extra_repr(self) -> str:
        return f"mask={self.mask!r}"

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        if isinstance(self.mask, ColumnMask):
            return self.mask.join(a, b)
        return torch.cat([b, a] if self.mask.reverse else [a, b], 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, b = self.mask.split(x)
        ya, lda = self.first(a, context)
        yb, ldb = self.second(b, context)
        return self._join(ya, yb), lda + ldb

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a, b = self.mask.split(y)
        xa, lda = self.first.inverse_and_logdet(a, context)
        xb, ldb = self.second.inverse_and_logdet(b, context)
        return self._join(xa, xb), lda + ldb

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_logdet(y, context)[0]

    def output_shape(self, input_shape: Shape) -> Shape:
        self.mask.channels(tuple(input_shape))
        return tuple(input_shape)
