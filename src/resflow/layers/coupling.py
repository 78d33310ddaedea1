"""Coupling layers: ``y_a = x_a``, ``y_b = T(x_b; conditioner(x_a, context))``.

The input is split by a *mask* into a conditioning part ``x_a``, passed unchanged,
and a transformed part ``x_b``, mapped elementwise by a
:class:`~resflow.layers.transformers.Transformer` whose parameters a free-form
network (the *conditioner*) computes from ``x_a`` and the optional context. The
Jacobian is triangular, so ``log|det dy/dx| = sum log T'(x_b)``, and the inverse needs
one conditioner pass: ``x_b = T^{-1}(y_b; conditioner(y_a, context))``.

This one layer is NICE (additive), RealNVP (affine, checkerboard and channel masks)
and Glow (affine with the sigmoid scale, channel mask), and with other transformers
Flow++.

References:
    Dinh, Krueger & Bengio (2015), NICE: non-linear independent components estimation.
    Dinh, Sohl-Dickstein & Bengio (2017), Density estimation using Real NVP.
    Kingma & Dhariwal (2018), Glow: generative flow with invertible 1x1 convolutions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer, Shape
from resflow.layers.transformers import Transformer

SubnetConstructor = Callable[[int, int], nn.Module]
"""``(in_channels_or_features, out_channels_or_features) -> conditioner`` (FrEIA)."""


class Mask:
    """How a coupling splits ``x``: ``x_a`` (conditioner input), ``x_b`` (transformed).

    Subclasses implement :meth:`channels`, :meth:`split`, :meth:`merge` and
    :meth:`logdet`; they work along dim 1 (features of ``[B, D]``, channels of
    ``[B, C, H, W]``).
    """

    def channels(self, shape: Shape) -> tuple[int, int]:
        """``(size of x_a, size of x_b)`` along dim 1 for one example of ``shape``
        (raises ``ValueError`` for shapes the mask cannot split)."""
        raise NotImplementedError

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_a, x_b)``."""
        raise NotImplementedError

    def merge(self, x: Tensor, y_b: Tensor) -> Tensor:
        """The output: ``x_a`` from ``x`` (unchanged) and the transformed ``y_b``."""
        raise NotImplementedError

    def logdet(self, logdet_b: Tensor) -> Tensor:
        """Per-sample sum of the elementwise logdets of the transformed elements."""
        return logdet_b.flatten(1).sum(1)


def _halves(shape: Shape, what: str) -> int:
    if len(shape) < 1 or shape[0] < 2:
        raise ValueError(f"{what} needs at least 2 features/channels in dim 1, got shape {shape}")
    return shape[0] // 2


@dataclass(frozen=True)
class ChannelMask(Mask):
    """Split dim 1 into its first ``floor(C/2)`` and its last ``ceil(C/2)`` entries.

    ``reverse=False``: the first part conditions, the second is transformed;
    ``reverse=True``: the other way round (alternate the two between layers). Works
    for vectors ``[B, D]`` and images ``[B, C, H, W]`` (RealNVP's channel-wise mask,
    Glow's split).
    """

    reverse: bool = False

    def channels(self, shape: Shape) -> tuple[int, int]:
        k = _halves(tuple(shape), "ChannelMask")
        return (shape[0] - k, k) if self.reverse else (k, shape[0] - k)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = _halves(tuple(x.shape[1:]), "ChannelMask")
        first, second = x[:, :k], x[:, k:]
        return (second, first) if self.reverse else (first, second)

    def merge(self, x: Tensor, y_b: Tensor) -> Tensor:
        k = x.shape[1] // 2
        return torch.cat([y_b, x[:, k:]] if self.reverse else [x[:, :k], y_b], 1)


@dataclass(frozen=True)
class AlternateMask(Mask):
    """Parity mask along dim 1: even indices condition, odd ones are transformed
    (``reverse=True``: odd condition, even transformed). For vectors and images."""

    reverse: bool = False

    def channels(self, shape: Shape) -> tuple[int, int]:
        _halves(tuple(shape), "AlternateMask")
        n_even, n_odd = (shape[0] + 1) // 2, shape[0] // 2
        return (n_odd, n_even) if self.reverse else (n_even, n_odd)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _halves(tuple(x.shape[1:]), "AlternateMask")
        even, odd = x[:, 0::2], x[:, 1::2]
        return (odd, even) if self.reverse else (even, odd)

    def merge(self, x: Tensor, y_b: Tensor) -> Tensor:
        c = x.shape[1]
        idx = torch.arange(c, device=x.device)
        order = torch.cat([idx[0::2], idx[1::2]])  # positions of cat([even, odd])
        even, odd = (y_b, x[:, 1::2]) if self.reverse else (x[:, 0::2], y_b)
        return torch.cat([even, odd], 1).index_select(1, torch.argsort(order))


@dataclass(frozen=True)
class CheckerboardMask(Mask):
    """RealNVP's spatial checkerboard for images ``[B, C, H, W]``.

    ``m[h, w] = 1`` (conditioning) where ``h + w`` is even, ``0`` (transformed) where it
    is odd; ``reverse=True`` swaps the two. Multiplicative, as in RealNVP: the
    conditioner sees ``x * m`` (all channels), the transformer acts on every element,
    and ``y = m * x + (1 - m) * T(x)``, with only the ``1 - m`` elements counted in the
    logdet. (The combination uses ``where`` so that a transformer overflowing at the
    ignored positions cannot leak ``inf * 0`` into the output.)
    """

    reverse: bool = False

    def channels(self, shape: Shape) -> tuple[int, int]:
        if len(shape) != 3:
            raise ValueError(
                f"CheckerboardMask needs images [C, H, W] per example, got shape {tuple(shape)}"
            )
        return shape[0], shape[0]

    def mask(self, x: Tensor) -> Tensor:
        """Boolean ``[1, 1, H, W]``: ``True`` at the conditioning positions."""
        self.channels(tuple(x.shape[1:]))
        h = torch.arange(x.shape[2], device=x.device).view(-1, 1)
        w = torch.arange(x.shape[3], device=x.device).view(1, -1)
        m = (h + w) % 2 == (1 if self.reverse else 0)
        return m.view(1, 1, *m.shape)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.where(self.mask(x), x, torch.zeros_like(x)), x

    def merge(self, x: Tensor, y_b: Tensor) -> Tensor:
        return torch.where(self.mask(x), x, y_b)

    def logdet(self, logdet_b: Tensor) -> Tensor:
        m = self.mask(logdet_b)
        return torch.where(m, torch.zeros_like(logdet_b), logdet_b).flatten(1).sum(1)


@dataclass(frozen=True)
class ColumnMask(Mask):
    """Alternate columns of images ``[B, C, H, W]`` (``W`` even): even columns condition,
    odd ones are transformed (``reverse=True``: the other way round).

    Both halves are ``[B, C, H, W/2]`` tensors, so the conditioner and the transformer
    work on half the positions (unlike :class:`CheckerboardMask`, which keeps all of them
    and masks). This is Flow++'s ``CheckerboardSplit`` (Ho et al. 2019), which despite
    its name splits by columns.
    """

    reverse: bool = False

    def channels(self, shape: Shape) -> tuple[int, int]:
        if len(shape) != 3 or shape[2] % 2:
            raise ValueError(
                f"ColumnMask needs images [C, H, W] with an even width, got shape {tuple(shape)}"
            )
        return shape[0], shape[0]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.channels(tuple(x.shape[1:]))
        even, odd = x[..., 0::2], x[..., 1::2]
        return (odd, even) if self.reverse else (even, odd)

    def merge(self, x: Tensor, y_b: Tensor) -> Tensor:
        x_a = x[..., 1::2] if self.reverse else x[..., 0::2]
        return self.join(x_a, y_b)

    def join(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """The image whose split is ``(x_a, x_b)``."""
        even, odd = (x_b, x_a) if self.reverse else (x_a, x_b)
        return torch.stack([even, odd], -1).flatten(-2)


class Coupling(FlowLayer):
    """``y_a = x_a``, ``y_b = T(x_b; conditioner(x_a, context))``.

    Arguments:
        mask: a :class:`Mask` (:class:`ChannelMask`, :class:`AlternateMask`,
            :class:`CheckerboardMask`, :class:`ColumnMask`).
        conditioner: any module called as ``conditioner(x_a)`` (no context) or
            ``conditioner(x_a, context)``, returning ``n_params * (size of x_b in dim 1)``
            channels/features (and ``x_b``'s spatial size); channel ``i * c_b + c`` is
            parameter ``i`` of channel ``c``.
        transformer: the elementwise map, e.g. ``Affine("sigmoid")`` (Glow).

    ``forward`` and ``inverse`` each cost one conditioner pass; ``inverse_and_logdet``
    returns ``-sum log T'`` from that same pass. Use :meth:`build` to size the
    conditioner from the data shape.

    Example:
        >>> from resflow.layers.transformers import Affine
        >>> from resflow.nets.conditioners import MLP
        >>> layer = Coupling.build((4,), ChannelMask(), Affine(), MLP)
        >>> x = torch.randn(8, 4)
        >>> y, logdet = layer(x)  # zero-initialised conditioner: the identity
        >>> torch.equal(y, x), torch.equal(logdet, torch.zeros(8))
        (True, True)
    """

    def __init__(self, mask: Mask, conditioner: nn.Module, transformer: Transformer) -> None:
        super().__init__()
        self.mask = mask
        self.conditioner = conditioner
        self.transformer = transformer

    @classmethod
    def build(
        cls,
        shape: Shape,
        mask: Mask,
        transformer: Transformer,
        subnet_constructor: SubnetConstructor,
    ) -> Coupling:
        """A coupling for examples of ``shape`` whose conditioner is
        ``subnet_constructor(size of x_a, n_params * size of x_b)`` (sizes along dim 1).

        For a conditional layer pass a constructor that knows the context size, e.g.
        ``functools.partial(MLP, context_features=10)``.
        """
        c_a, c_b = mask.channels(tuple(shape))
        return cls(mask, subnet_constructor(c_a, transformer.n_params * c_b), transformer)

    def extra_repr(self) -> str:
        return f"mask={self.mask!r}"

    def _params(self, x_a: Tensor, x_b: Tensor, context: Tensor | None) -> Tensor:
        out = self.conditioner(x_a) if context is None else self.conditioner(x_a, context)
        n, c_b = self.transformer.n_params, x_b.shape[1]
        expected = (x_b.shape[0], n * c_b, *x_b.shape[2:])
        if tuple(out.shape) != expected:
            raise ValueError(
                f"the conditioner returned shape {tuple(out.shape)}, expected {expected}: "
                f"n_params ({n}) x {c_b} transformed channels/features"
                + (f" x spatial {tuple(x_b.shape[2:])}" if x_b.dim() > 2 else "")
            )
        return out.unflatten(1, (n, c_b))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"Coupling expects [B, D] or [B, C, H, W], got {tuple(x.shape)}")
        self.mask.channels(tuple(x.shape[1:]))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        x_a, x_b = self.mask.split(x)
        y_b, logdet_b = self.transformer(x_b, self._params(x_a, x_b, context))
        return self.mask.merge(x, y_b), self.mask.logdet(logdet_b)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        y_a, y_b = self.mask.split(y)
        x_b, logdet_b = self.transformer.inverse(y_b, self._params(y_a, y_b, context))
        return self.mask.merge(y, x_b), self.mask.logdet(logdet_b)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_logdet(y, context)[0]
