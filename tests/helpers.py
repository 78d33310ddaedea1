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


def grads_by_read_path(monkeypatch, block: ResidualBlock, x: Tensor, loss_fn) -> list:  # type: ignore[no-untyped-def]
    """``[dL/dx, dL/dparams...]`` of ``loss_fn(*block(x))`` with reading the device
    taken as free (the host-reading backward) and as not free (the device-side one),
    the same random draws in both; the two gradient lists. The device-side path stays
    patched in afterwards."""
    import resflow.layers.residual.in_forward as logdet_module

    outs = []
    for free in (True, False):
        monkeypatch.setattr(logdet_module, "reads_are_free", lambda t, free=free: free)
        block.zero_grad()
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        loss_fn(*block(xg)).backward()
        outs.append([xg.grad] + [p.grad for p in block.g.parameters()])
    return outs


def assert_same_grads(a: list, b: list, msg: str = "") -> None:  # type: ignore[type-arg]
    """Equal gradient lists (float64 rounding), ``None`` in the same places."""
    for ga, gb in zip(a, b):
        assert (ga is None) == (gb is None), msg
        if ga is not None:
            torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-9, msg=msg)


class NanAfter:
    """A maximum-likelihood objective whose loss turns NaN after ``step`` calls (a
    training run that diverges at a known step)."""

    def __init__(self, model, step: int) -> None:
        from resflow.training.objectives import MaximumLikelihood

        self.inner = MaximumLikelihood(model)
        self.unit = self.inner.unit
        self.calls, self.step = 0, step

    def __call__(self, model, batch):
        loss, extra = self.inner(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.step else loss), extra
