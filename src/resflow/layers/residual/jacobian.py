"""Jacobian products of contractive branches without autograd.

For a branch ``g = L_n o a_{n-1} o ... o a_1 o L_1`` of Lipschitz linear/conv layers
``L_i`` and elementwise activations ``a_i``, ``v^T J_g = v^T L_n D_{n-1} ... D_1 L_1``
with ``D_i = diag(a_i'(z_i))``. :class:`Linearization` runs ``g`` once, caching every
``a_i'(z_i)`` and constrained weight, and then gives

* :meth:`Linearization.vjp` -- ``u^T J``: one transposed layer and one multiplication
  per layer, no autograd graph (the power series needs many per block);
* :meth:`Linearization.neumann_grads` -- the gradient of ``S = sum_b w_b^T J v_b`` with
  respect to the input and every parameter (``w`` held fixed): the Neumann-series
  gradient of Residual Flows (Chen et al. 2019, Theorem 2) in closed form. A tangent
  pass ``t = J v`` and a cotangent pass ``r = w^T J`` give the first-order weight terms
  ``r_out (x) t_in``; the second-order terms ``e_i = r_i * t_i * a_i''(z_i)`` are then
  back-propagated once along the value path. This replaces autograd's double backward,
  whose many elementwise passes dominate the cost of large residual blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.residual.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    conv2d,
    conv2d_adjoint,
    conv2d_weight,
)

VJP = Callable[[Tensor], Tensor]


@dataclass
class _Layer:
    module: LipschitzLinear | LipschitzConv2d
    weight: Tensor  # constrained weight, with its graph to the raw parameters
    inp: Tensor  # input (detached)

    @property
    def conv(self) -> bool:
        return isinstance(self.module, LipschitzConv2d)

    @property
    def pointwise(self) -> bool:
        return self.conv and self.weight.shape[-1] == 1 and self.weight.shape[-2] == 1

    def apply(self, u: Tensor) -> Tensor:
        w = self.weight.detach()
        if self.conv:
            return conv2d(u, w, None, self.module.padding)
        return F.linear(u, w)

    def apply_t(self, u: Tensor) -> Tensor:
        w = self.weight.detach()
        if self.conv:
            return conv2d_adjoint(u, w, self.module.padding, self.inp.shape)
        return u @ w

    def weight_grad(self, cot: Tensor, inp: Tensor) -> Tensor:
        """``sum_b cot_b (x) inp_b`` shaped like the weight."""
        if self.pointwise:
            b, o = cot.shape[:2]
            prod = cot.reshape(b, o, -1) @ inp.reshape(b, inp.shape[1], -1).transpose(1, 2)
            return prod.sum(0).view(self.weight.shape)
        if self.conv:
            return conv2d_weight(inp, self.weight.shape, cot, self.module.padding)
        return cot.reshape(-1, cot.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])


@dataclass
class _Act:
    module: nn.Module
    z: Tensor  # input (detached)
    d1: Tensor  # a'(z)

    def second_order(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``a''(z)`` and, for a learned parameter ``beta``, ``da/dbeta`` and ``da'/dbeta``."""
        m = self.module
        if hasattr(m, "derivatives"):
            _, d2, da, dd = m.derivatives(self.z)
            return d2, da, dd
        return m.second_derivative(self.z), None, None  # type: ignore[operator]


def _supported(g: nn.Module) -> bool:
    return isinstance(g, nn.Sequential) and all(
        isinstance(m, (LipschitzLinear, LipschitzConv2d))
        or (hasattr(m, "derivative") and hasattr(m, "second_derivative"))
        for m in g
    )


class Linearization:
    """``g(x)`` (with an autograd graph when grad mode is on) and its cached derivatives."""

    def __init__(self, g: nn.Sequential, x: Tensor) -> None:
        self.steps: list[_Layer | _Act] = []
        h = x
        for m in g:
            if isinstance(m, (LipschitzLinear, LipschitzConv2d)):
                if isinstance(m, LipschitzConv2d):
                    m.prepare(h)
                w = m.constrained_weight()
                self.steps.append(_Layer(m, w, h.detach()))
                if isinstance(m, LipschitzConv2d):
                    h = conv2d(h, w, m.bias, m.padding)
                else:
                    h = F.linear(h, w, m.bias)
            else:
                z = h.detach()
                with torch.no_grad():
                    self.steps.append(_Act(m, z, m.derivative(z)))  # type: ignore[operator]
                h = m(h)
        self.output = h

    @torch.no_grad()
    def vjp(self, u: Tensor) -> Tensor:
        """``u^T dg/dx``."""
        for s in reversed(self.steps):
            u = u * s.d1 if isinstance(s, _Act) else s.apply_t(u)
        return u

    @torch.no_grad()
    def neumann_grads(
        self, pairs: list[tuple[Tensor, Tensor]], scale: float = 1.0
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Gradient of ``scale * sum_{(v, w)} sum_b w_b^T J v_b`` (``w`` fixed).

        Returns ``dS/dx`` (per sample) and ``(tensor, grad)`` pairs for the constrained
        weights, biases and activation parameters; :func:`chain_to_parameters` turns
        them into gradients of the raw parameters.
        """
        grads: dict[int, Tensor] = {}

        def add(key: int, value: Tensor) -> None:
            grads[key] = grads[key] + value if key in grads else value

        grad_x: Tensor | None = None
        second = {i: s.second_order() for i, s in enumerate(self.steps) if isinstance(s, _Act)}
        for v, w in pairs:
            # tangent pass: t at every step's input
            tangents = []
            t = v
            for s in self.steps:
                tangents.append(t)
                t = t * s.d1 if isinstance(s, _Act) else s.apply(t)
            # cotangent pass of w: first-order terms and e_i = r_i t_i a''(z_i)
            r = w
            inject: dict[int, Tensor] = {}
            for i in range(len(self.steps) - 1, -1, -1):
                s = self.steps[i]
                if isinstance(s, _Act):
                    d2, _, dd = second[i]
                    rt = r * tangents[i]
                    if dd is not None:
                        add(-i - 1, torch.linalg.vecdot(rt.flatten(), dd.flatten()))
                    inject[i] = rt.mul_(d2)
                    r = r * s.d1
                else:
                    add(i, s.weight_grad(r, tangents[i]))
                    r = s.apply_t(r)
            # value path: back-propagate the injected second-order terms
            c: Tensor | None = None
            for i in range(len(self.steps) - 1, -1, -1):
                s = self.steps[i]
                if isinstance(s, _Act):
                    _, da, _ = second[i]
                    if c is not None and da is not None:
                        add(-i - 1, torch.linalg.vecdot(c.flatten(), da.flatten()))
                    c = inject.pop(i) if c is None else inject.pop(i).addcmul_(c, s.d1)
                elif c is not None:
                    add(i, s.weight_grad(c, s.inp))
                    if s.module.bias is not None:
                        add(1000 + i, c.sum(0) if not s.conv else c.sum((0, 2, 3)))
                    c = s.apply_t(c)
            gx = c if c is not None else torch.zeros_like(v)
            grad_x = gx if grad_x is None else grad_x + gx
        assert grad_x is not None
        out: list[tuple[Tensor, Tensor]] = []
        for key, value in grads.items():
            if key >= 1000:
                bias = self.steps[key - 1000].module.bias  # type: ignore[union-attr]
                out.append((bias, value * scale))
            elif key >= 0:
                out.append((self.steps[key].weight, value * scale))  # type: ignore[union-attr]
            else:
                with torch.enable_grad():  # beta = softplus(b): keep its graph to b
                    beta, _ = self.steps[-key - 1].module.param_chain()  # type: ignore[union-attr]
                out.append((beta, value * scale))
        return grad_x * scale, out


def linearize(g: nn.Module, x: Tensor) -> tuple[Tensor, Linearization | None]:
    """``(g(x), linearization)``; the linearization is ``None`` when ``g`` is not a plain
    sequence of Lipschitz layers and activations with known derivatives."""
    if not _supported(g):
        return g(x), None
    lin = Linearization(g, x)  # type: ignore[arg-type]
    return lin.output, lin


def chain_to_parameters(
    pairs: list[tuple[Tensor, Tensor]], params: list[Tensor]
) -> list[Tensor | None]:
    """Gradients of the raw ``params`` from ``(derived tensor, gradient)`` pairs
    (through the spectral normalisation, softplus of LipSwish's beta, ...)."""
    outs = [t for t, _ in pairs]
    grads = [g for _, g in pairs]
    leaf = [(t, g) for t, g in zip(outs, grads) if not t.requires_grad or t.grad_fn is None]
    graph = [(t, g) for t, g in zip(outs, grads) if t.requires_grad and t.grad_fn is not None]
    result: list[Tensor | None] = [None] * len(params)
    if graph:
        got = torch.autograd.grad(
            [t for t, _ in graph], params, [g for _, g in graph], allow_unused=True,
            retain_graph=True,
        )  # fmt: skip
        result = list(got)
    index = {id(p): k for k, p in enumerate(params)}
    for t, g in leaf:
        k = index.get(id(t))
        if k is not None:
            result[k] = g if result[k] is None else result[k] + g
    return result
