"""Conditioner networks of coupling layers, with an optional context input.

Both are called as ``net(x, context=None)``. A net built with ``context_features=0``
(``context_channels=0``) is unconditional and ignores a context it is given, as
layers may (see :mod:`resflow.layers.base`); one built with a context size requires
it. ``zero_init`` zeroes the last layer, so that a coupling with ``Affine("exp")`` or
``Additive`` starts at the identity (RealNVP, Dinh et al. 2017; Glow, Kingma &
Dhariwal 2018, §3.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def hidden_activation(name: str) -> nn.Module:
    """A hidden activation by name (``relu``, ``elu``, ``gelu``, ``silu``, ``tanh``,
    ``leaky_relu``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def check_context(
    context: Tensor | None, x: Tensor, size: int, what: str, spatial: bool = False
) -> Tensor | None:
    """Validate ``context`` for a net expecting ``size`` context features (0: none).

    Returns ``None`` for an unconditional net, else the context (``[B, size]``, or with
    ``spatial`` also ``[B, size, H, W]`` matching ``x``).
    """
    if size == 0:
        return None
    if context is None:
        raise ValueError(f"{what} expects a context with {size} features, got none")
    ok_vec = context.dim() == 2 and context.shape == (x.shape[0], size)
    ok_img = (
        spatial
        and context.dim() == x.dim()
        and context.shape[:2] == (x.shape[0], size)
        and context.shape[2:] == x.shape[2:]
    )
    if not (ok_vec or ok_img):
        kind = f"[B, {size}]"
        if spatial:
            kind += f" or [B, {size}, {', '.join(map(str, x.shape[2:]))}]"
        raise ValueError(
            f"{what} expects a context of shape {kind} for input {tuple(x.shape)}, "
            f"got {tuple(context.shape)}"
        )
    return context


def concat_context(x: Tensor, context: Tensor | None) -> Tensor:
    """``cat([x, context], 1)``, a context vector ``[B, k]`` broadcast over an image's
    ``H, W`` (an image context ``[B, k, H, W]`` is concatenated as it is)."""
    if context is None:
        return x
    if x.dim() > 2 and context.dim() == 2:
        context = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
    return torch.cat([x, context.to(x.dtype)], 1)


class MLP(nn.Module):
    """``Linear -> act -> ... -> Linear`` on ``cat([x, context], 1)``.

    Arguments:
        in_features, out_features: sizes of ``x`` and of the output.
        hidden: widths of the hidden layers.
        activation: hidden activation name (see :func:`hidden_activation`).
        context_features: size of the context vector (0: unconditional).
        zero_init: zero the last layer's weight and bias.

    Example:
        >>> net = MLP(2, 4, hidden=(8,), context_features=3)
        >>> net(torch.randn(5, 2), torch.randn(5, 3)).shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        context_features: int = 0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.context_features = context_features
        sizes = [in_features + context_features, *hidden, out_features]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i > 0:
                mods.append(hidden_activation(activation))
            mods.append(nn.Linear(a, b))
        self.net = nn.Sequential(*mods)
        if zero_init:
            last = mods[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects [B, {self.in_features}], got {tuple(x.shape)}")
        context = check_context(context, x, self.context_features, "MLP")
        return self.net(concat_context(x, context))


class ConvNet(nn.Module):
    """Glow's coupling network: ``conv3x3 -> act -> conv1x1 -> act -> conv3x3``.

    The convolutions have ``same`` padding, so the output keeps ``H, W``. A context
    enters as extra input channels: a vector ``[B, k]`` is broadcast over ``H, W``, an
    image ``[B, k, H, W]`` is concatenated.

    Arguments:
        in_channels, out_channels: channels of ``x`` and of the output.
        hidden: channels of the hidden layers.
        kernel_sizes: one odd kernel size per convolution (Glow: ``(3, 1, 3)``).
        activation: hidden activation name (see :func:`hidden_activation`).
        context_channels: channels of the context (0: unconditional).
        zero_init: zero the last convolution (Glow's "zero initialisation", §3.3).

    Example:
        >>> net = ConvNet(2, 4, hidden=8)
        >>> net(torch.randn(5, 2, 6, 6)).shape
        torch.Size([5, 4, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        activation: str = "relu",
        context_channels: int = 0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel sizes must be odd and positive, got {tuple(kernel_sizes)}")
        self.in_channels = in_channels
        self.context_channels = context_channels
        n = len(kernel_sizes)
        sizes = [in_channels + context_channels, *([hidden] * (n - 1)), out_channels]
        mods: list[nn.Module] = []
        for i, k in enumerate(kernel_sizes):
            if i > 0:
                mods.append(hidden_activation(activation))
            mods.append(nn.Conv2d(sizes[i], sizes[i + 1], k, padding=k // 2))
        self.net = nn.Sequential(*mods)
        if zero_init:
            last = mods[-1]
            assert isinstance(last, nn.Conv2d)
            nn.init.zeros_(last.weight)
            assert last.bias is not None
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ConvNet expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        context = check_context(context, x, self.context_channels, "ConvNet", spatial=True)
        return self.net(concat_context(x, context))


class ResidualMLP(nn.Module):
    """An MLP of pre-activation residual blocks (He et al. 2016), the coupling
    network of neural spline flows (Durkan et al. 2019):
    ``Linear -> blocks x (h + Linear(drop(act(Linear(act(h)))))) -> act? -> Linear``.

    Arguments:
        in_features, out_features: sizes of ``x`` and of the output.
        hidden: width of every hidden layer.
        blocks: residual blocks.
        activation: hidden activation name (see :func:`hidden_activation`).
        dropout: dropout probability inside the blocks.
        context_features: size of the context vector (0: unconditional), concatenated
            to the input.
        zero_init: zero the last layer's weight and bias.

    Example:
        >>> net = ResidualMLP(3, 4, hidden=8, blocks=2, context_features=2)
        >>> net(torch.randn(5, 3), torch.randn(5, 2)).shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        blocks: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
        context_features: int = 0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        self.context_features = context_features
        self.first = nn.Linear(in_features + context_features, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                hidden_activation(activation),
                nn.Linear(hidden, hidden),
                hidden_activation(activation),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
            )
            for _ in range(blocks)
        )
        self.last = nn.Linear(hidden, out_features)
        if zero_init:
            nn.init.zeros_(self.last.weight)
            nn.init.zeros_(self.last.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"ResidualMLP expects [B, {self.in_features}], got {tuple(x.shape)}")
        context = check_context(context, x, self.context_features, "ResidualMLP")
        h = self.first(concat_context(x, context))
        for block in self.blocks:
            h = h + block(h)
        return self.last(h)


class ResidualConvNet(nn.Module):
    """A convolutional net of pre-activation residual blocks, the coupling network of
    neural spline flows on images: ``conv3x3 -> blocks x (h + conv3x3(drop(act(BN(
    conv3x3(act(BN(h)))))))) -> act(BN) -> zero-initialised conv1x1``.

    Arguments:
        in_channels, out_channels: channels of ``x`` and of the output.
        hidden: channels of every hidden layer.
        blocks: residual blocks.
        dropout: dropout probability inside the blocks.
        batchnorm: batch normalization before each activation.
        context_channels: channels of a context (a vector is broadcast over ``H, W``).

    Example:
        >>> net = ResidualConvNet(2, 6, hidden=8, blocks=1)
        >>> net(torch.randn(3, 2, 4, 4)).shape
        torch.Size([3, 6, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 96,
        blocks: int = 3,
        dropout: float = 0.0,
        batchnorm: bool = True,
        context_channels: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.context_channels = context_channels

        def norm() -> nn.Module:
            return nn.BatchNorm2d(hidden) if batchnorm else nn.Identity()

        self.first = nn.Conv2d(in_channels + context_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                norm(),
                nn.ReLU(),
                nn.Conv2d(hidden, hidden, 3, padding=1),
                norm(),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Conv2d(hidden, hidden, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.head = nn.Sequential(norm(), nn.ReLU())
        self.last = nn.Conv2d(hidden, out_channels, 1)
        nn.init.zeros_(self.last.weight)
        assert self.last.bias is not None
        nn.init.zeros_(self.last.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResidualConvNet expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        context = check_context(context, x, self.context_channels, "ResidualConvNet", True)
        h = self.first(concat_context(x, context))
        for block in self.blocks:
            h = h + block(h)
        return self.last(self.head(h))
