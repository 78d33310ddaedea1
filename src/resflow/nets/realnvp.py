"""RealNVP's coupling networks (Dinh, Sohl-Dickstein & Bengio 2017, §4.1).

A deep residual conv net (ReLU, batch norm, weight-normalised convolutions, identity
skips inside each block and a skip path from every block to the output) computes
``(h_s, t)``; the log-scale is ``scale * tanh(h_s)`` with a learned per-channel
``scale``, the translation is affine. The output layer starts at zero, so with
``Affine("exp")`` a coupling is the identity at initialisation. The L2 penalty of the
paper (5e-5) is on the weight-normalisation scale parameters ``g``: see
:func:`weight_scales`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from resflow.nets.conditioners import MLP, check_context, concat_context


def _wn_conv(c_in: int, c_out: int, k: int) -> nn.Module:
    return weight_norm(nn.Conv2d(c_in, c_out, k, padding=k // 2))


class TanhScale(nn.Module):
    """``params = (scale * tanh(h_s), t)`` for an affine transformer's ``(h, t)``
    (``n_params = 2``: the first ``out // 2`` channels/features are ``h``)."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        if n_out % 2:
            raise ValueError(f"TanhScale needs an even number of outputs (h, t), got {n_out}")
        self.scale = nn.Parameter(torch.ones(n_out // 2))

    def forward(self, out: Tensor) -> Tensor:
        h, t = out.chunk(2, dim=1)
        scale = self.scale.view(1, -1, *([1] * (out.dim() - 2)))
        return torch.cat([scale * torch.tanh(h), t], 1)


class ResidualUnit(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))`` with weight-normalised 3x3 convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            _wn_conv(channels, channels, 3),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            _wn_conv(channels, channels, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class RealNVPResNet(nn.Module):
    """RealNVP's conditioner: ``conv3x3 -> n_blocks residual units (each also feeding a
    1x1 skip path) -> BN -> ReLU -> zero-initialised conv3x3 -> (scale tanh(h), t)``.

    Arguments:
        in_channels, out_channels: channels of ``x_a`` and of the output (``2 C_b`` for
            an affine coupling).
        hidden: feature maps (the paper: 32 for 32x32 data, 64 for CIFAR-10).
        n_blocks: residual units (the paper: 4 for 32x32, 2 for 64x64, 8 for CIFAR-10).
        context_channels: channels of a context (a vector is broadcast over ``H, W``).
        tanh_scale: apply ``scale * tanh`` to the first half of the outputs.
        scale_l2: coefficient of :meth:`penalty` (the paper: 5e-5).

    Example:
        >>> net = RealNVPResNet(3, 6, hidden=8, n_blocks=1)
        >>> net(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 6, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        n_blocks: int = 8,
        context_channels: int = 0,
        tanh_scale: bool = True,
        scale_l2: float = 0.0,
    ) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.in_channels = in_channels
        self.context_channels = context_channels
        self.scale_l2 = scale_l2
        self.stem = _wn_conv(in_channels + context_channels, hidden, 3)
        self.units = nn.ModuleList(ResidualUnit(hidden) for _ in range(n_blocks))
        self.skips = nn.ModuleList(_wn_conv(hidden, hidden, 1) for _ in range(n_blocks))
        self.head = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU())
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]
        self.tanh = TanhScale(out_channels) if tanh_scale else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"RealNVPResNet expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        context = check_context(context, x, self.context_channels, "RealNVPResNet", spatial=True)
        x = concat_context(x, context)
        h = self.stem(x)
        skip = torch.zeros_like(h)
        for unit, proj in zip(self.units, self.skips):
            h = unit(h)
            skip = skip + proj(h)
        out = self.out(self.head(skip))
        return self.tanh(out) if self.tanh is not None else out

    def penalty(self) -> Tensor:
        """``scale_l2 * sum g^2`` over the weight-norm scales (a training loss term)."""
        if self.scale_l2 == 0:
            return self.out.weight.new_zeros(())
        return self.scale_l2 * sum(g.pow(2).sum() for g in weight_scales(self))  # type: ignore[return-value]


class RealNVPMLP(nn.Module):
    """The vector counterpart: an :class:`MLP` (zero-initialised last layer) followed by
    ``scale * tanh`` on the log-scale half."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: tuple[int, ...] = (64, 64),
        context_features: int = 0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.mlp = MLP(in_features, out_features, hidden, activation, context_features)
        self.tanh = TanhScale(out_features)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.tanh(self.mlp(x, context))


def weight_scales(model: nn.Module) -> Iterator[Tensor]:
    """The weight-normalisation scales ``g`` of every weight-normalised layer (the
    parameters RealNVP's L2 penalty acts on)."""
    for name, p in model.named_parameters():
        if name.endswith("parametrizations.weight.original0"):
            yield p
