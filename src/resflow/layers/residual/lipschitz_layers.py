"""The two concrete Lipschitz layers: dense (:class:`LipschitzLinear`) and stride-1
'same' 2-D convolution (:class:`LipschitzConv2d`), each an operator, its adjoint and the
facts its certified bounds need, over the shared machinery of
:class:`~resflow.layers.residual.spectral.LipschitzLayer`.

>>> import torch
>>> layer = LipschitzLinear(3, 3, coeff=0.9)
>>> bool(torch.linalg.matrix_norm(layer.constrained_weight().detach(), ord=2) <= 0.9)
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.residual.conv_ops import conv2d, conv2d_adjoint
from resflow.layers.residual.mixed_norms import OperatorFacts, conv_facts, dense_facts
from resflow.layers.residual.norms import Order
from resflow.layers.residual.spectral import LipschitzLayer
from resflow.layers.residual.spectral_bounds import (
    conv_spectral_norm,
    spectral_bound_holds,
    spectral_norm,
    top_singular_vector,
)


class LipschitzLinear(LipschitzLayer, nn.Linear):
    """Linear layer with ``||W||_{p->q} <= coeff`` (spectral norm when p = q = 2)."""

    dense_operator = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.98,
        domain: Order = 2.0,
        codomain: Order = 2.0,
        atol: float = 1e-3,
        rtol: float = 1e-3,
        max_iter: int = 200,
        init_iter: int = 200,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_lipschitz(coeff, domain, codomain, atol, rtol, max_iter, init_iter)
        v = torch.randn(1, in_features)
        self.register_buffer("v", v / v.norm())
        self.certify(max_iter=init_iter)

    def _op(self, v: Tensor) -> Tensor:
        return F.linear(v, self.weight)

    def _facts(self, w: Tensor) -> OperatorFacts:
        return dense_facts(w)

    def _spectral_bound(self, w: Tensor, guess: float | None) -> Tensor:
        return spectral_norm(w, guess)

    def _top_singular(self) -> tuple[Tensor, Tensor] | None:
        return top_singular_vector(self.weight)

    def _bound_holds(self, guess: float) -> bool | None:
        return spectral_bound_holds(self.weight, guess)

    def _dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _op_t(self, u: Tensor) -> Tensor:
        return F.linear(u, self.weight.t())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.constrained_weight(), self.bias)


class LipschitzConv2d(LipschitzLayer, nn.Conv2d):
    """2-D convolution (stride 1, 'same' padding) with operator norm ``<= coeff``.

    The power-iteration vector has the shape of one input image; it is created on the
    first forward pass (and resized when a checkpoint is loaded).
    """

    conv_operator = True  # a stride-1 'same' convolution (batched norm work: refresh.py)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        coeff: float = 0.98,
        domain: Order = 2.0,
        codomain: Order = 2.0,
        atol: float = 1e-3,
        rtol: float = 1e-3,
        max_iter: int = 200,
        init_iter: int = 200,
    ) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias
        )
        self._init_lipschitz(coeff, domain, codomain, atol, rtol, max_iter, init_iter)
        self.register_buffer("v", torch.empty(0))

    def _op(self, v: Tensor) -> Tensor:
        return conv2d(v, self.weight, None, self.padding)

    def _op_t(self, u: Tensor) -> Tensor:
        return conv2d_adjoint(u, self.weight, self.padding, self.v.shape)

    def _facts(self, w: Tensor) -> OperatorFacts:
        return conv_facts(w, self._size(), self._pad())

    def _spectral_bound(self, w: Tensor, guess: float | None) -> Tensor:
        return conv_spectral_norm(w, self._size(), self._pad(), guess=guess).value

    def _top_singular(self) -> tuple[Tensor, Tensor] | None:
        return top_singular_vector(self.weight, self._size(), self._pad())

    def _bound_holds(self, guess: float) -> bool | None:
        return spectral_bound_holds(self.weight, guess, self._size(), self._pad())

    def _size(self) -> tuple[int, int]:
        return int(self.v.shape[2]), int(self.v.shape[3])

    def _pad(self) -> tuple[int, int]:
        return int(self.padding[0]), int(self.padding[1])

    def _dims(self) -> tuple[int, int]:
        n = self.v.shape[2] * self.v.shape[3]
        return self.in_channels * n, self.out_channels * n

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "v"
        if key in state_dict and state_dict[key].shape != self.v.shape:
            self.v = torch.empty_like(state_dict[key], device=self.v.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        self.prepare(x)
        return conv2d(x, self.constrained_weight(), self.bias, self.padding)

    def prepare(self, x: Tensor) -> None:
        """Check the input shape; on first use create the power-iteration vector."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        shape = (1, *x.shape[1:])
        if self.v.shape != shape:
            if self.v.numel() != 0:
                raise ValueError(
                    f"input size {tuple(x.shape[1:])} differs from the size "
                    f"{tuple(self.v.shape[1:])} this layer's norm was estimated for"
                )
            v = torch.randn(shape, device=x.device, dtype=x.dtype)
            self.v = v / v.norm()
            self.certify(max_iter=self.init_iter)
