"""Lipschitz-constrained linear and convolutional layers.

The weight is rescaled as ``W / max(1, sigma(W) / c)`` where ``sigma`` is the induced
operator norm ``||W||_{p -> q}`` (``p`` = domain order, ``q`` = codomain order; both 2
gives the spectral norm of Miyato et al. 2018). ``sigma`` is estimated by an adaptive
power iteration (Behrmann et al. 2019; for ``p, q != 2`` the generalized power method
of Residual Flows, Chen et al. 2019, Appendix D) whose vectors are persistent buffers.

For convolutions the norm is that of the convolution *operator* on the actual input
shape (power iteration through ``conv2d`` / ``conv_transpose2d``), not that of the
reshaped kernel matrix.

Estimates are refreshed by :func:`refresh_lipschitz`, which a training loop calls after
every optimizer step and before evaluation.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.base import preserved_transient_state

INF = math.inf


class NormOrder(nn.Module):
    """A learned norm order ``p = 1 + softplus(raw)`` in ``(1, inf)``, shareable by layers."""

    def __init__(self, init: float = 2.0) -> None:
        super().__init__()
        if not 1.0 < init < INF:
            raise ValueError(f"a learned norm order must start in (1, inf), got {init}")
        self.raw = nn.Parameter(torch.tensor(math.log(math.expm1(init - 1.0))))

    def value(self) -> Tensor:
        return 1.0 + F.softplus(self.raw)


Order = float | NormOrder


def closed_form_norm(w: Tensor, domain: Order, codomain: Order) -> Tensor | None:
    """``||W||_{p -> q}`` exactly where a closed form exists, else ``None``: ``q = inf``
    gives the largest ``p*``-norm of a row, ``p = 1`` the largest ``q``-norm of a column
    (for a convolution, the kernel's output and input slices)."""
    if isinstance(domain, NormOrder) or isinstance(codomain, NormOrder):
        return None
    p, q = float(domain), float(codomain)
    if q == INF:
        return torch.linalg.vector_norm(w.flatten(1), ord=_conjugate(p), dim=1).max()
    if p == 1.0:
        return torch.linalg.vector_norm(w.transpose(0, 1).flatten(1), ord=q, dim=1).max()
    return None


def _order(p: Order) -> Tensor | float:
    return p.value() if isinstance(p, NormOrder) else p


def _conjugate(p: Tensor | float) -> Tensor | float:
    if isinstance(p, Tensor):
        return p / (p - 1.0)
    if p == 1.0:
        return INF
    if p == INF:
        return 1.0
    return p / (p - 1.0)


def _norm(x: Tensor, p: Tensor | float) -> Tensor:
    """p-norm of the whole tensor (differentiable in ``x`` and in a tensor ``p``)."""
    if isinstance(p, Tensor):
        a = x.abs().flatten()
        m = a.max().clamp_min(1e-30)
        return m * ((a / m) ** p).sum() ** (1.0 / p)
    return torch.linalg.vector_norm(x.flatten(), ord=p)


def _dual(x: Tensor, p: Tensor | float) -> Tensor:
    """A unit vector in the dual norm ``p*`` attaining ``<dual, x> = ||x||_p``."""
    p = float(p)
    if p == INF:
        flat = x.flatten()
        out = torch.zeros_like(flat)
        i = flat.abs().argmax()
        out[i] = torch.sign(flat[i]) if flat[i] != 0 else 1.0
        return out.view_as(x)
    if p == 1.0:
        return torch.sign(x)
    n = _norm(x, p).clamp_min(1e-30)
    return torch.sign(x) * (x.abs() / n) ** (p - 1.0)


class LipschitzLayer(nn.Module):
    """Shared machinery of the constrained layers: norm estimate, refresh, rescaling.

    Subclasses define ``_op(v)`` (the operator without bias, on a single domain
    element of shape ``[1, ...]``) and ``_op_t(u)`` (its adjoint).

    Where the induced norm has a closed form (``q = inf``: the largest ``p*``-norm of
    a row; ``p = 1``: the largest ``q``-norm of a column; for a convolution the rows
    and columns of its operator are the kernel's output and input slices), it is used
    exactly; otherwise the power iteration estimates it.
    """

    weight: Tensor
    v: Tensor
    sigma: Tensor

    def _init_lipschitz(
        self,
        coeff: float,
        domain: Order,
        codomain: Order,
        atol: float,
        rtol: float,
        max_iter: int,
        init_iter: int,
    ) -> None:
        if not 0.0 < coeff:
            raise ValueError(f"coeff must be positive, got {coeff}")
        for name, p in (("domain", domain), ("codomain", codomain)):
            if not isinstance(p, NormOrder) and not (p >= 1.0):
                raise ValueError(f"{name} norm order must be >= 1 (or inf), got {p}")
        self.coeff = coeff
        self.domain = domain
        self.codomain = codomain
        self.atol, self.rtol, self.max_iter, self.init_iter = atol, rtol, max_iter, init_iter
        self.register_buffer("sigma", torch.ones(()))

    def _op(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _op_t(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def refresh(
        self, atol: float | None = None, rtol: float | None = None, max_iter: int | None = None
    ) -> int:
        """Run the power iteration until the norm estimate settles; returns the iterations.

        Stops when ``|sigma_k - sigma_{k-1}| <= atol + rtol * sigma_k`` or after
        ``max_iter`` iterations (the estimate is then the best found so far).
        """
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        max_iter = self.max_iter if max_iter is None else max_iter
        closed = self._closed_form_norm()
        if closed is not None:
            self.sigma.copy_(closed)
            return 0
        if self.v.numel() == 0:
            return 0  # a convolution that has not seen an input yet
        p, q = float(_order(self.domain)), float(_order(self.codomain))
        v = self.v
        sigma = self.sigma.clone()
        it = 0
        while it < max_iter:
            it += 1
            u = _dual(self._op(v), q)
            v = _dual(self._op_t(u), _conjugate(p))
            new = _norm(self._op(v), q) / _norm(v, p).clamp_min(1e-30)
            done = abs(float(new - sigma)) <= atol + rtol * float(new)
            sigma = new
            if done:
                break
        self.v.copy_(v)
        self.sigma.copy_(sigma)
        return it

    def after_optimizer_step(self) -> None:
        """The generic hook of :func:`resflow.layers.base.after_optimizer_step`."""
        self.refresh()

    def transient_state(self) -> tuple[Tensor, Tensor]:
        """The power-iteration state (see :func:`resflow.layers.base.preserved_transient_state`)."""
        return self.v.clone(), self.sigma.clone()

    def load_transient_state(self, state: tuple[Tensor, Tensor]) -> None:
        self.v = state[0]
        self.sigma.copy_(state[1])

    def _closed_form_norm(self) -> Tensor | None:
        return closed_form_norm(self.weight, self.domain, self.codomain)

    def operator_norm(self) -> Tensor:
        """Differentiable norm: the closed form where one exists, else the estimate
        ``||W v||_q / ||v||_p`` at the stored power-iteration vector ``v``."""
        closed = self._closed_form_norm()
        if closed is not None:
            return closed
        v = self.v
        p, q = _order(self.domain), _order(self.codomain)
        return _norm(self._op(v), q) / _norm(v, p).clamp_min(1e-30)

    def constrained_weight(self) -> Tensor:
        """``W / max(1, sigma / c)``."""
        sigma = self.operator_norm()
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def extra_repr(self) -> str:
        def show(p: Order) -> str:
            return "learned" if isinstance(p, NormOrder) else str(p)

        return (
            f"{super().extra_repr()}, coeff={self.coeff}, "
            f"domain={show(self.domain)}, codomain={show(self.codomain)}"
        )


class LipschitzLinear(LipschitzLayer, nn.Linear):
    """Linear layer with ``||W||_{p->q} <= coeff`` (spectral norm when p = q = 2)."""

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
        self.refresh(max_iter=init_iter)

    def _op(self, v: Tensor) -> Tensor:
        return F.linear(v, self.weight)

    def _op_t(self, u: Tensor) -> Tensor:
        return F.linear(u, self.weight.t())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.constrained_weight(), self.bias)


class LipschitzConv2d(LipschitzLayer, nn.Conv2d):
    """2-D convolution (stride 1, 'same' padding) with operator norm ``<= coeff``.

    The power-iteration vector has the shape of one input image; it is created on the
    first forward pass (and resized when a checkpoint is loaded).
    """

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
            self.refresh(max_iter=self.init_iter)


def conv2d(x: Tensor, w: Tensor, bias: Tensor | None, padding: tuple[int, ...]) -> Tensor:
    """``F.conv2d`` with 1x1 kernels done as one batched matrix product (faster on CPU)."""
    if w.shape[-1] == 1 and w.shape[-2] == 1:
        b, c, h, wd = x.shape
        y = torch.matmul(w.view(w.shape[0], c), x.reshape(b, c, h * wd)).view(b, -1, h, wd)
        return y if bias is None else y + bias.view(1, -1, 1, 1)
    return F.conv2d(x, w, bias, padding=padding)


def conv2d_adjoint(
    u: Tensor, w: Tensor, padding: tuple[int, ...], in_shape: torch.Size | tuple[int, ...]
) -> Tensor:
    """The adjoint of :func:`conv2d` (no bias) applied to ``u``, for inputs shaped like
    ``in_shape`` (batch taken from ``u``): a matrix product for 1x1 kernels, else the
    kernel autograd uses for convolution input gradients."""
    if w.shape[-1] == 1 and w.shape[-2] == 1:
        b, c, h, wd = u.shape
        return torch.matmul(w.view(c, -1).t(), u.reshape(b, c, h * wd)).view(b, -1, h, wd)
    shape = (u.shape[0], *in_shape[1:])
    return torch.nn.grad.conv2d_input(shape, w, u, padding=padding)


@torch.no_grad()
def refresh_lipschitz(
    model: nn.Module,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
) -> int:
    """Refresh every norm estimate in ``model``; returns the largest iteration count.

    Call after every optimizer step and before evaluation.
    """
    most = 0
    for m in model.modules():
        if isinstance(m, LipschitzLayer):
            most = max(most, m.refresh(atol=atol, rtol=rtol, max_iter=max_iter))
    return most


def preserved_norm_state(model: nn.Module) -> AbstractContextManager[None]:
    """Restore every norm estimate (vectors and sigma) on exit (an alias of
    :func:`resflow.layers.base.preserved_transient_state`)."""
    return preserved_transient_state(model)
