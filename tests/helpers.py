"""Shared test helpers: brute-force Jacobians and strongly non-linear residual blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from resflow.layers import LipschitzLinear, LipSwish, ResidualBlock, refresh_lipschitz
from resflow.nets import residual_mlp


def brute_logdet(fn, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """``log|det d fn(x_i) / d x_i|`` per sample from the dense autograd Jacobian."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda t: fn(t.unsqueeze(0))[0], xi)
        d = xi.numel()
        out.append(torch.linalg.slogdet(jac.reshape(d, d))[1])
    return torch.stack(out)


def strong_block(d: int, seed: int = 1, coeff: float = 0.98) -> ResidualBlock:
    """A residual block whose Jacobian is far from linear-small: orthogonal weights at
    norm ``coeff`` and a nearly ReLU-like LipSwish, so higher series terms matter."""
    torch.manual_seed(seed)
    g = residual_mlp(d, (d,), coeff=coeff, preact=False)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, LipschitzLinear):
                q, _ = torch.linalg.qr(torch.randn(d, d))
                m.weight.copy_(3 * q)
            if isinstance(m, LipSwish):
                m.b.fill_(5.0)
    refresh_lipschitz(g, atol=1e-9, rtol=1e-9, max_iter=10_000)
    return ResidualBlock(g)
