"""Glow's coupling network (Kingma & Dhariwal 2018, §3.3 and Table 1).

``conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> ZeroConv3x3``, where the
last convolution starts at zero and its output is scaled by a learned
``exp(3 * log_scale)`` per channel (also zero at the start), so a coupling starts
with ``h = t = 0``: an additive coupling is the identity and the affine one with
``sigmoid(h + 2)`` scales by the constant ``sigmoid(2) = 0.881``. The ActNorms are
the flow layer's, used as plain normalizations (their logdet is not part of the
model's). The vector counterpart is a zero-initialised MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.actnorm import ActNorm
from resflow.nets.conditioners import check_context, concat_context


class _Norm(nn.Module):
    """ActNorm's data-initialised affine map without its logdet."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ActNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)[0]


def edge_pad(x: Tensor, pad: int = 1) -> Tensor:
    """``x`` zero-padded by ``pad`` on each side, with one more channel that is 1 on the
    padding and 0 inside (the "edge bias" of the Glow authors' convolutions: a padded
    convolution that knows where the image ends)."""
    b, _, h, w = x.shape
    edge = x.new_ones(1, 1, h + 2 * pad, w + 2 * pad)
    edge[..., pad : pad + h, pad : pad + w] = 0
    return torch.cat([F.pad(x, (pad, pad, pad, pad)), edge.expand(b, -1, -1, -1)], 1)


class EdgeConv2d(nn.Conv2d):
    """A "same" convolution; with ``edge_bias`` it sees :func:`edge_pad`'s extra channel
    (one more input channel, no padding of its own). A 1x1 kernel has no padding and
    no edge channel."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 3, bias: bool = True, edge_bias: bool = False
    ) -> None:
        self.edge_bias = edge_bias and kernel > 1
        pad = 0 if self.edge_bias else kernel // 2
        super().__init__(c_in + int(self.edge_bias), c_out, kernel, padding=pad, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.edge_bias:
            x = edge_pad(x, self.kernel_size[0] // 2)
        return super().forward(x)


class ZeroConv2d(nn.Module):
    """``conv(x) * exp(3 * log_scale)`` with weight, bias and ``log_scale`` all zero
    at the start (Glow's ``Conv2dZeros``; ``edge_bias``: see :class:`EdgeConv2d`)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, edge_bias: bool = False) -> None:
        super().__init__()
        self.conv = EdgeConv2d(c_in, c_out, kernel, edge_bias=edge_bias)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)  # type: ignore[arg-type]
        self.log_scale = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(3.0 * self.log_scale).view(1, -1, 1, 1)


class GlowNet(nn.Module):
    """Glow's ``NN()`` of an affine or additive coupling (see the module docstring).

    Arguments:
        in_channels, out_channels: channels of ``x_a`` and of the output.
        hidden: hidden channels (the paper: 512).
        context_channels: channels of a context (a vector is broadcast over ``H, W``).
        edge_bias: the 3x3 convolutions see where the image ends (the authors' code,
            :class:`EdgeConv2d`).

    Example:
        >>> net = GlowNet(2, 4, hidden=8)
        >>> float(net(torch.randn(3, 2, 4, 4)).abs().max())
        0.0
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 512,
        context_channels: int = 0,
        edge_bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.context_channels = context_channels
        self.net = nn.Sequential(
            EdgeConv2d(in_channels + context_channels, hidden, 3, bias=False, edge_bias=edge_bias),
            _Norm(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1, bias=False),
            _Norm(hidden),
            nn.ReLU(),
            ZeroConv2d(hidden, out_channels, edge_bias=edge_bias),
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"GlowNet expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        context = check_context(context, x, self.context_channels, "GlowNet", spatial=True)
        x = concat_context(x, context)
        return self.net(x)
