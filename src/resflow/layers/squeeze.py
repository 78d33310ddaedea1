"""Space-to-depth squeeze (RealNVP, Dinh et al. 2017): ``[C, H, W] -> [4C, H/2, W/2]``."""

from __future__ import annotations

from torch import Tensor

from resflow.layers.base import FlowLayer, Shape, zero_logdet


class Squeeze(FlowLayer):
    """Move each ``factor x factor`` spatial patch into channels; a permutation (logdet 0)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 2:
            raise ValueError(f"factor must be >= 2, got {factor}")
        self.factor = factor

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"Squeeze({f}) needs height and width divisible by {f}, got {h}x{w}")
        y = x.view(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, c * f * f, h // f, w // f), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = y.shape
        f = self.factor
        if c % (f * f):
            raise ValueError(f"Squeeze({f}).inverse needs channels divisible by {f * f}, got {c}")
        x = y.view(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // (f * f), h * f, w * f)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(y), zero_logdet(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        c, h, w = input_shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"Squeeze({f}) needs height and width divisible by {f}, got {h}x{w}")
        return (c * f * f, h // f, w // f)
