"""Contractive residual branches ``g`` for residual blocks (Residual Flows, Chen et al. 2019, §1.1).

Every weight is Lipschitz-constrained (``||W|| <= coeff``) and every activation is
1-Lipschitz, so ``Lip(g) <= coeff**n_layers < 1``. A branch conditioned on a context
``c`` (:class:`ConditionedBranch`) shifts its first layer's output by ``V c``, which
leaves ``Lip`` in ``x`` -- and so the block's invertibility -- as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class ConditionedBranch(nn.Module):
    """``g(x; c)``: a contractive branch whose first layer's output is shifted by a
    linear map of the context, ``L_n(... a(L_1(x) + V c) ...)``.

    ``V`` is unconstrained and zero at initialisation (an untrained conditional block is
    the unconditional one). A shift by a function of ``c`` alone leaves the Lipschitz
    constant in ``x`` that of ``branch``, so the certificate and ``Lip(g) < 1`` hold for
    every context. Used by :class:`~resflow.layers.residual.block.ResidualBlock` as a
    :class:`~resflow.layers.residual.block.ContextBranch`.

    Args:
        branch: the unconditional branch, e.g. :func:`residual_mlp`; it needs a linear
            layer.
        context_features: size ``k`` of the context ``[B, k]``.

    Example:
        >>> import torch
        >>> g = residual_mlp(2, (8,), context_features=3)
        >>> g(torch.zeros(4, 2), torch.ones(4, 3)).shape
        torch.Size([4, 2])
    """

    def __init__(self, branch: nn.Sequential, context_features: int) -> None:
        super().__init__()
        first = next((i for i, m in enumerate(branch) if isinstance(m, LipschitzLinear)), None)
        if first is None:
            raise ValueError("a conditioned branch shifts its first linear layer; found none")
        if context_features < 1:
            raise ValueError(f"context_features must be >= 1, got {context_features}")
        self.branch = branch
        self.context_features = context_features
        self.first = first
        # V, zero (drawing no random numbers: the branch's weights are those of the
        # unconditional branch built from the same seed)
        self.shift = nn.Parameter(torch.zeros(branch[first].out_features, context_features))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = x
        for i, m in enumerate(self.branch):
            h = m(h)
            if i == self.first:
                h = h + F.linear(context, self.shift)
        return h

    def extra_repr(self) -> str:
        return f"context_features={self.context_features}, shifts layer {self.first}"


def residual_mlp(
    dim: int,
    hidden: Sequence[int] = (128, 128, 128),
    coeff: float = 0.98,
    activation: str = "lipswish",
    preact: bool = True,
    norm_orders: Sequence[float] | None = None,
    learn_orders: bool = False,
    context_features: int = 0,
) -> nn.Sequential | ConditionedBranch:
    """``[act] -> Linear -> act -> Linear ... -> Linear`` mapping ``dim -> dim``.

    Args:
        dim: data dimension.
        hidden: widths of the hidden layers (``len(hidden) + 1`` linear layers).
        coeff: Lipschitz coefficient of every linear layer.
        activation: ``lipswish``, ``elu`` or ``softplus``.
        preact: start with an activation (pre-activation residual branch).
        norm_orders: induced-norm order at each layer's input (default all 2).
        learn_orders: learn the norm orders jointly with the model.
        context_features: size of a context ``c``; above 0 the branch is a
            :class:`ConditionedBranch` ``g(x; c)`` (its first layer shifted by ``V c``).
    """
    widths = [dim, *hidden, dim]
    orders = _orders(len(widths) - 1, norm_orders, learn_orders)

    def layer(i: int) -> nn.Module:
        return LipschitzLinear(
            widths[i], widths[i + 1], coeff=coeff, domain=orders[i], codomain=orders[i + 1]
        )

    branch = _branch(len(widths) - 1, layer, activation, preact)
    return ConditionedBranch(branch, context_features) if context_features else branch


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
