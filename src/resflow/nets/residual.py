"""Contractive residual branches ``g`` for residual blocks (Residual Flows, Chen et al. 2019, §1.1).

Every weight is Lipschitz-constrained (``||W|| <= coeff``) and every activation is
1-Lipschitz, so ``Lip(g) <= coeff**n_layers < 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from resflow.layers.residual.activations import make_activation
from resflow.layers.residual.lipschitz_layers import LipschitzConv2d, LipschitzLinear
from resflow.layers.residual.norms import NormOrder, Order


def _orders(n_layers: int, norm_orders: Sequence[float] | None, learn_orders: bool) -> list[Order]:
    """Norm orders at the n+1 interfaces of an n-layer branch; the last equals the first.

    ``norm_orders`` gives the order at each interface ``0..n-1`` (the last interface
    closes the loop onto the first, so that ``Lip(g)`` is bounded in one norm).
    """
    if norm_orders is None:
        norm_orders = [2.0] * n_layers
    if len(norm_orders) != n_layers:
        raise ValueError(
            f"need {n_layers} norm orders (one per layer input), got {len(norm_orders)}"
        )
    orders: list[Order] = [NormOrder(p) if learn_orders else float(p) for p in norm_orders]
    return [*orders, orders[0]]


def _branch(
    n_layers: int, layer: Callable[[int], nn.Module], activation: str, preact: bool
) -> nn.Sequential:
    """``[act] -> layer(0) -> act -> layer(1) -> ... -> layer(n-1)``."""
    mods: list[nn.Module] = [make_activation(activation)] if preact else []
    for i in range(n_layers):
        if i > 0:
            mods.append(make_activation(activation))
        mods.append(layer(i))
    return nn.Sequential(*mods)


def residual_mlp(
    dim: int,
    hidden: Sequence[int] = (128, 128, 128),
    coeff: float = 0.98,
    activation: str = "lipswish",
    preact: bool = True,
    norm_orders: Sequence[float] | None = None,
    learn_orders: bool = False,
) -> nn.Sequential:
    """``[act] -> Linear -> act -> Linear ... -> Linear`` mapping ``dim -> dim``.

    Args:
        dim: data dimension.
        hidden: widths of the hidden layers (``len(hidden) + 1`` linear layers).
        coeff: Lipschitz coefficient of every linear layer.
        activation: ``lipswish``, ``elu`` or ``softplus``.
        preact: start with an activation (pre-activation residual branch).
        norm_orders: induced-norm order at each layer's input (default all 2).
        learn_orders: learn the norm orders jointly with the model.
    """
    widths = [dim, *hidden, dim]
    orders = _orders(len(widths) - 1, norm_orders, learn_orders)

    def layer(i: int) -> nn.Module:
        return LipschitzLinear(
            widths[i], widths[i + 1], coeff=coeff, domain=orders[i], codomain=orders[i + 1]
        )

    return _branch(len(widths) - 1, layer, activation, preact)


def residual_cnn(
    channels: int,
    hidden: int = 512,
    kernels: Sequence[int] = (3, 1, 3),
    coeff: float = 0.98,
    activation: str = "lipswish",
    preact: bool = True,
    norm_orders: Sequence[float] | None = None,
    learn_orders: bool = False,
) -> nn.Sequential:
    """``[act] -> Conv3x3 -> act -> Conv1x1 -> act -> Conv3x3`` (default kernels 3-1-3).

    The paper's image branch has hidden width 512; the very first block of a model
    has no leading activation (``preact=False``).
    """
    widths = [channels, *([hidden] * (len(kernels) - 1)), channels]
    orders = _orders(len(kernels), norm_orders, learn_orders)

    def layer(i: int) -> nn.Module:
        return LipschitzConv2d(
            widths[i], widths[i + 1], kernels[i], coeff=coeff, domain=orders[i],
            codomain=orders[i + 1],
        )  # fmt: skip

    return _branch(len(kernels), layer, activation, preact)
