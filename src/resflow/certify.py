"""A certificate for a trained model: is it the invertible density it claims to be?

For every residual block ``x + g(x)``:

* the Lipschitz bound actually enforced: the operator norm of each constrained weight
  *as used in the forward pass* (``W / max(1, sigma_estimate / c)``), computed exactly
  where possible -- the largest singular value of a dense weight, of the dense
  convolution operator on its input shape when that fits in memory, or the closed
  form of a mixed norm -- else by a power iteration run to convergence (marked as an
  estimate); the block's bound is their product (the activations are 1-Lipschitz) and
  must be ``< 1``;
* the worst inverse error ``|f^-1(f(x)) - x|`` on test data, block by block;

and, for data of at most :data:`EXACT_DIMS` dimensions, the gap between the model's
estimated log-density and the exact one (full Jacobians). Used by ``resflow check``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.flow import Flow
from resflow.layers.residual.block import InverseNotConvergedError, ResidualBlock
from resflow.layers.residual.lipschitz import (
    LipschitzConv2d,
    LipschitzLayer,
    LipschitzLinear,
    NormOrder,
    closed_form_norm,
)
from resflow.layers.residual.logdet import EXACT_ESTIMATOR

EXACT_DIMS = 16
"""Data dimension up to which the exact log-density is computed."""
DENSE_LIMIT = 1 << 22
"""Largest dense convolution operator (entries) whose singular values are computed."""
INVERSE_TOL = 1e-4
"""Largest acceptable inverse error relative to ``1 + |x|``."""


@dataclass
class LayerNorm:
    name: str
    coeff: float
    norm: float
    method: str


@dataclass
class BlockReport:
    name: str
    bound: float
    inverse_error: float
    layers: list[LayerNorm] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.bound < 1.0 and self.inverse_error <= INVERSE_TOL


@dataclass
class Certificate:
    """What :func:`certify` found; :attr:`passed` is ``True`` when every check holds."""

    blocks: list[BlockReport]
    n_examples: int
    density_gap: tuple[float, float, float] | None = None  # mean, stderr, max |gap|
    density_note: str = ""

    @property
    def density_ok(self) -> bool:
        if self.density_gap is None:
            return True
        mean, se, _ = self.density_gap
        return abs(mean) <= 3 * se + 1e-3

    @property
    def passed(self) -> bool:
        return all(b.ok for b in self.blocks) and self.density_ok

    def lines(self) -> list[str]:
        out = [f"{len(self.blocks)} residual block(s), inverse checked on {self.n_examples} "
               "test example(s)"]  # fmt: skip
        for b in self.blocks:
            mark = "ok  " if b.ok else "FAIL"
            out.append(
                f"{mark} {b.name}: Lip(g) <= {b.bound:.6f}, inverse error {b.inverse_error:.2e}"
            )
            for layer in b.layers:
                out.append(
                    f"       {layer.name}: ||W|| = {layer.norm:.6f} (coeff {layer.coeff}, "
                    f"{layer.method})"
                )
        if self.density_gap is None:
            out.append(f"log-density: {self.density_note}")
        else:
            mean, se, worst = self.density_gap
            mark = "ok  " if self.density_ok else "FAIL"
            out.append(
                f"{mark} log-density estimate - exact: {mean:+.2e} +- {se:.1e} nats "
                f"(worst {worst:.2e})"
            )
        out.append("certificate: PASSED" if self.passed else "certificate: FAILED")
        return out


def _orders(m: LipschitzLayer) -> tuple[float, float] | None:
    if isinstance(m.domain, NormOrder) or isinstance(m.codomain, NormOrder):
        return None
    return float(m.domain), float(m.codomain)


@torch.no_grad()
def _power(m: LipschitzLayer, w: Tensor, iters: int = 5000) -> float:
    """The 2-norm of the operator of ``w`` by power iteration to convergence."""
    v = m.v.detach().to(w.dtype).clone() if m.v.numel() else None
    if v is None:
        return float("nan")
    v = v / v.norm()
    prev = 0.0
    for _ in range(iters):
        if isinstance(m, LipschitzConv2d):
            u = F.conv2d(v, w, None, padding=m.padding)
            v = torch.nn.grad.conv2d_input(v.shape, w, u, padding=m.padding)
        else:
            v = F.linear(F.linear(v, w), w.t())
        sigma2 = float(v.norm())
        v = v / max(sigma2, 1e-300)
        if abs(sigma2 - prev) <= 1e-12 * sigma2:
            break
        prev = sigma2
    return math.sqrt(prev if prev else sigma2)


@torch.no_grad()
def enforced_norm(m: LipschitzLayer) -> tuple[float, str]:
    """``(||W_constrained||, method)`` for the weight the forward pass uses."""
    w = m.constrained_weight().detach().double()
    orders = _orders(m)
    if orders is not None and orders != (2.0, 2.0):
        p, q = orders
        if q == math.inf or p == 1.0:
            return float(closed_form_norm(w, p, q)), "exact (closed form)"
        return float("nan"), "mixed norm without a closed form: not certified"
    if orders is None:
        return float("nan"), "learned norm orders: not certified"
    if isinstance(m, LipschitzLinear):
        return float(torch.linalg.matrix_norm(w, ord=2)), "exact (SVD)"
    shape = tuple(m.v.shape[1:])
    n_in = math.prod(shape)
    n_out = m.out_channels * shape[1] * shape[2]
    if n_in * n_out <= DENSE_LIMIT:
        basis = torch.eye(n_in, dtype=w.dtype).view(n_in, *shape)
        op = F.conv2d(basis, w, None, padding=m.padding).reshape(n_in, -1)
        return float(torch.linalg.matrix_norm(op, ord=2)), "exact (dense operator SVD)"
    return _power(m, w), "power iteration to convergence (estimate)"


@contextmanager
def _exact_logdets(model: nn.Module) -> Iterator[None]:
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    saved = [b.eval_estimator for b in blocks]
    try:
        for b in blocks:
            b.eval_estimator = EXACT_ESTIMATOR
        yield
    finally:
        for b, est in zip(blocks, saved):
            b.eval_estimator = est


def _block_inputs(model: Flow, x: Tensor) -> dict[str, Tensor]:
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, ResidualBlock):

            def hook(mod: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                inputs[name] = args[0].detach()

            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def certify(model: Flow, data: Tensor, n_examples: int = 256) -> Certificate:
    """Check ``model`` (in eval mode, as loaded) on up to ``n_examples`` of ``data``."""
    model.eval()
    x = data[:n_examples]
    torch.manual_seed(0)
    inputs = _block_inputs(model, x)
    reports = []
    for name, m in model.named_modules():
        if not isinstance(m, ResidualBlock):
            continue
        norms = []
        for lname, layer in m.g.named_modules():
            if isinstance(layer, LipschitzLayer):
                value, method = enforced_norm(layer)
                norms.append(LayerNorm(f"g.{lname}", layer.coeff, value, method))
        bound = math.prod(n.norm for n in norms) if norms else 0.0
        xin = inputs.get(name)
        error = float("nan")
        if xin is not None:
            try:
                with torch.no_grad():
                    y, _ = m(xin)
                    back = m.inverse(y)
                error = float(((back - xin).abs() / (1 + xin.abs())).max())
            except InverseNotConvergedError:
                error = math.inf
        reports.append(BlockReport(name, bound, error, norms))
    cert = Certificate(reports, len(x))
    if model.dim > EXACT_DIMS:
        cert.density_note = f"exact check skipped (D = {model.dim} > {EXACT_DIMS})"
        return cert
    torch.manual_seed(1)
    with torch.no_grad():
        estimated = model.log_prob(x).double()
    torch.manual_seed(1)
    with _exact_logdets(model), torch.no_grad():
        exact = model.log_prob(x).double()
    gap = estimated - exact
    se = float(gap.std() / math.sqrt(len(gap))) if len(gap) > 1 else 0.0
    cert.density_gap = (float(gap.mean()), se, float(gap.abs().max()))
    return cert
