"""MADE: a masked MLP whose output for dimension ``d`` depends only on the inputs
before ``d`` in an order (Germain, Gregor, Murray & Larochelle 2015).

Each input ``d`` gets the degree ``m(d) in 1..D`` (its position in the order, plus
one) and each hidden unit ``k`` a degree ``m(k)``; a weight is kept by its mask when

* input/hidden -> hidden: ``m(k_out) >= m(k_in)``,
* hidden -> output of dimension ``d``: ``m(d) > m(k_in)``,

so that every path from input ``e`` to output ``d`` has ``m(e) < m(d)``. The hidden
degrees cycle through ``1..D-1`` (``0..D-1`` with a context: degree-0 units see only
the context, through which every output, the first included, depends on it). The
context feeds every unit of the first hidden layer without a mask (conditional MADE,
Papamakarios et al. 2017). This is the conditioner of
:class:`~resflow.layers.autoregressive.Autoregressive` (MAF).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.nets.conditioners import check_context, hidden_activation

OrderKind = Literal["natural", "reversed", "random"]


class MaskedLinear(nn.Linear):
    """``y = x (W * M)^T + b`` for a fixed 0/1 mask ``M`` of ``W``'s shape (a buffer)."""

    mask: Tensor

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_order(in_features: int, order: OrderKind | Sequence[int] | Tensor, seed: int) -> Tensor:
    """The order as a permutation: ``order[k]`` is the input dimension that comes ``k``-th."""
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(in_features)
        if order == "reversed":
            return torch.arange(in_features - 1, -1, -1)
        if order == "random":
            return torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        raise ValueError(f"unknown order {order!r}; choose 'natural', 'reversed' or 'random'")
    perm = torch.as_tensor(order, dtype=torch.long).flatten()
    if not torch.equal(torch.sort(perm).values, torch.arange(in_features)):
        raise ValueError(
            f"order must be a permutation of 0..{in_features - 1}, got {perm.tolist()}"
        )
    return perm


def _hidden_degrees(width: int, dims: int, lowest: int) -> Tensor:
    return lowest + torch.arange(width) % (dims - lowest)


class _MaskedResidualBlock(nn.Module):
    """``h + L2(act(L1(act(h))))`` with both masks ``m(k_out) >= m(k_in)`` on equal degrees."""

    def __init__(self, mask: Tensor, activation: str) -> None:
        super().__init__()
        self.act1, self.act2 = hidden_activation(activation), hidden_activation(activation)
        self.linear1, self.linear2 = MaskedLinear(mask), MaskedLinear(mask)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.linear2(self.act2(self.linear1(self.act1(h))))


class MADE(nn.Module):
    """A masked autoregressive MLP: ``[B, D] -> [B, n_params * D]``.

    Output ``i * D + d`` is parameter ``i`` of dimension ``d`` (reshape to
    ``[B, n_params, D]`` to index ``[:, i, d]``), a function of the inputs before ``d``
    in :attr:`order` and of the context only.

    References:
        Germain, Gregor, Murray & Larochelle (2015), MADE: masked autoencoder for
        distribution estimation.
        Papamakarios, Pavlakou & Murray (2017), Masked autoregressive flow for density
        estimation (the conditional MADE and MAF).

    Arguments:
        in_features: ``D``.
        hidden: widths of the hidden layers.
        n_params: parameters per dimension (the transformer's ``n_params``).
        order: ``"natural"`` (``0..D-1``), ``"reversed"``, ``"random"`` (drawn from
            ``seed``), or an explicit permutation.
        seed: seed of the random order.
        context_features: size of a context vector ``[B, k]`` (0: unconditional; an
            unconditional MADE ignores a context it is given).
        activation: hidden activation name (``relu``, ``elu``, ``tanh``, ...).
        residual: replace the hidden layers after the first by residual blocks
            ``h + L(act(L(act(h))))`` of masked layers (``len(hidden) - 1`` blocks;
            all widths must be equal).
        zero_init: zero the output layer, so that an ``Affine("exp")`` or ``Additive``
            autoregressive layer starts at the identity.

    Example:
        >>> made = MADE(3, (16,), n_params=2, order="reversed")
        >>> made.order
        tensor([2, 1, 0])
        >>> made(torch.randn(4, 3)).shape
        torch.Size([4, 6])
    """

    order: Tensor
    degrees: Tensor

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64, 64),
        n_params: int = 2,
        order: OrderKind | Sequence[int] | Tensor = "natural",
        seed: int = 0,
        context_features: int = 0,
        activation: str = "relu",
        residual: bool = False,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 1 or n_params < 1 or not hidden:
            raise ValueError("MADE needs in_features >= 1, n_params >= 1 and a hidden layer")
        if residual and len(set(hidden)) != 1:
            raise ValueError(f"a residual MADE needs equal hidden widths, got {tuple(hidden)}")
        self.in_features = in_features
        self.n_params = n_params
        self.context_features = context_features
        perm = made_order(in_features, order, seed)
        degrees = torch.empty(in_features, dtype=torch.long)
        degrees[perm] = torch.arange(1, in_features + 1)
        self.register_buffer("order", perm)
        self.register_buffer("degrees", degrees)

        lowest = 0 if (context_features > 0 or in_features == 1) else 1
        hid = [_hidden_degrees(h, in_features, lowest) for h in hidden]
        self.input_layer = MaskedLinear((hid[0][:, None] >= degrees[None, :]).float())
        self.context_layer = (
            nn.Linear(context_features, hidden[0], bias=False) if context_features > 0 else None
        )
        blocks: list[nn.Module] = []
        for a, b in zip(hid[:-1], hid[1:]):
            mask = (b[:, None] >= a[None, :]).float()
            if residual:
                blocks.append(_MaskedResidualBlock(mask, activation))
            else:
                blocks += [hidden_activation(activation), MaskedLinear(mask)]
        self.hidden = nn.Sequential(*blocks)
        self.final_activation = hidden_activation(activation)
        out_mask = (degrees[:, None] > hid[-1][None, :]).float().repeat(n_params, 1)
        self.output_layer = MaskedLinear(out_mask)
        if zero_init:
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, n_params={self.n_params}, "
            f"context_features={self.context_features}"
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"MADE expects [B, {self.in_features}], got {tuple(x.shape)}")
        context = check_context(context, x, self.context_features, "MADE")
        h = self.input_layer(x)
        if self.context_layer is not None and context is not None:
            h = h + self.context_layer(context.to(x.dtype))
        h = self.hidden(h)
        return self.output_layer(self.final_activation(h))
