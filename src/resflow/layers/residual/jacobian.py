"""Jacobian products of contractive branches without autograd.

For a branch ``g = L_n o a_{n-1} o ... o a_1 o L_1`` of Lipschitz linear/conv layers
``L_i`` and elementwise activations ``a_i``, ``v^T J_g = v^T L_n D_{n-1} ... D_1 L_1``
with ``D_i = diag(a_i'(z_i))``. :class:`Linearization` runs ``g`` once, caching every
``a_i'(z_i)`` and constrained weight, and then gives

* :meth:`Linearization.vjp` -- ``u^T J``: one transposed layer and one multiplication
  per layer, no autograd graph (the power series needs many per block);
* :func:`neumann_branch` -- ``(g(x), value)`` as one autograd function whose gradient
  is that of ``S = sum_b w_b^T J v_b`` (``w`` held fixed) for the pairs ``(v, w)`` an
  estimator returns: the Neumann-series gradient of Residual Flows (Chen et al. 2019,
  Theorem 2), or with ``w = (I + J)^{-T} e_j`` the exact logdet's gradient, in closed
  form. In the forward pass a tangent pass ``t = J v`` and a cotangent pass
  ``r = w^T J`` give the first-order weight terms ``r_out (x) t_in`` and the
  second-order terms ``e_i = r_i * t_i * a_i''(z_i)``; in the backward pass one reverse
  pass of ``g`` carries the output gradient and the ``e_i`` together, since both travel
  the value path. This replaces autograd's double backward (whose many elementwise
  passes dominate the cost of large residual blocks) and a separate backward of ``g``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.residual import in_forward
from resflow.layers.residual.conv_ops import conv2d, conv2d_adjoint, conv2d_weight
from resflow.layers.residual.lipschitz_layers import LipschitzConv2d, LipschitzLinear

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
    d1: Tensor  # a'(z)
    d2: Tensor | None = None  # a''(z), until the second-order term replaces it
    z: Tensor | None = None  # input, kept where no layer precedes (see ``_beta_grad``)
    out: Tensor | None = None  # a(z): the next layer's input
    inject: Tensor | None = None  # sum over pairs of r * t * a''(z)


def _learns(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def supported(g: nn.Module) -> bool:
    """A plain sequence of Lipschitz layers and activations with known derivatives, whose
    learned activation parameters (if any) are LipSwish-like (:meth:`param_chain`)."""
    return isinstance(g, nn.Sequential) and all(
        isinstance(m, (LipschitzLinear, LipschitzConv2d))
        or (
            hasattr(m, "derivative")
            and hasattr(m, "second_derivative")
            and (not _learns(m) or hasattr(m, "param_chain"))
        )
        for m in g
    )


def _activate(m: nn.Module, z: Tensor, second: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    if hasattr(m, "value_and_derivatives"):
        return m.value_and_derivatives(z, second)  # type: ignore[operator, no-any-return]
    d2 = m.second_derivative(z) if second else None  # type: ignore[operator]
    return m(z), m.derivative(z), d2  # type: ignore[operator]


class Linearization:
    """``g(x)`` and its cached derivatives.

    With grad mode on and ``second=False`` the output keeps its autograd graph (for the
    estimators that differentiate through the series); otherwise nothing is recorded
    and, with ``second``, ``a''`` is cached too for :func:`neumann_branch`.
    """

    def __init__(
        self, g: nn.Sequential, x: Tensor, second: bool = False, inputs: list[Tensor] | None = None
    ) -> None:
        self.steps: list[_Layer | _Act] = []
        self._kept: tuple[Tensor, list[Tensor]] | None = None  # see :meth:`jvp`
        graph = torch.is_grad_enabled() and not second
        given = iter(inputs) if inputs is not None else None  # see branch_inputs
        h = x
        for m in g:
            if isinstance(m, (LipschitzLinear, LipschitzConv2d)):
                if isinstance(m, LipschitzConv2d):
                    m.prepare(h)
                w = m.constrained_weight() if given is None else next(given)
                if given is not None and m.bias is not None:
                    next(given)  # the bias, used as the module's own below
                wd = w if graph else w.detach()
                self.steps.append(_Layer(m, wd, h.detach()))
                bias = m.bias if graph or m.bias is None else m.bias.detach()
                if isinstance(m, LipschitzConv2d):
                    h = conv2d(h, wd, bias, m.padding)
                else:
                    h = F.linear(h, wd, bias)
            elif graph:
                with torch.no_grad():
                    self.steps.append(_Act(m, m.derivative(h.detach())))  # type: ignore[operator]
                h = m(h)
            else:
                z = h.detach()
                if given is not None and _learns(m):
                    next(given)  # beta: the activation reads its own
                h, d1, d2 = _activate(m, z, second)
                prev = self.steps[-1] if self.steps else None
                keep_z = second and _learns(m) and not isinstance(prev, _Layer)
                self.steps.append(_Act(m, d1, d2, z if keep_z else None, h))
        self.output = h

    @torch.no_grad()
    def vjp(self, u: Tensor) -> Tensor:
        """``u^T dg/dx``."""
        for s in reversed(self.steps):
            u = u * s.d1 if isinstance(s, _Act) else s.apply_t(u)
        return u

    @property
    def vector(self) -> bool:
        """Whether every layer is linear (no convolution): products then take extra
        leading dimensions, so several vectors go through one pass."""
        return all(not isinstance(s, _Layer) or not s.conv for s in self.steps)

    @torch.no_grad()
    def jvp(self, v: Tensor) -> Tensor:
        """``dg/dx v`` (forward mode). Its intermediate tangents are kept for a later
        :meth:`first_order` of the same ``v``, which then skips its own tangent pass."""
        tangents = self._tangents(v, full=True)
        self._kept = (v, tangents)
        return tangents[-1]

    def _tangents(self, v: Tensor, full: bool = False) -> list[Tensor]:
        """The tangent ``t = J v`` at every step's input (and, with ``full``, ``J v``)."""
        kept = getattr(self, "_kept", None)
        if kept is not None and kept[0] is v:
            self._kept = None
            return kept[1]
        tangents = []
        t = v
        last = len(self.steps) - 1
        for i, s in enumerate(self.steps):
            tangents.append(t)
            if i < last or full:
                t = t * s.d1 if isinstance(s, _Act) else s.apply(t)
        if full:
            tangents.append(t)
        return tangents

    @torch.no_grad()
    def first_order(self, pairs: list[tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
        """The terms of ``d/dtheta sum_{(v, w)} sum_b w_b^T J v_b`` (``w`` fixed) that do
        not go through the value path: ``r_out (x) t_in`` per layer (tangent ``t = J v``,
        cotangent ``r = w^T J``), returned by step index; the second-order terms
        ``r t a''(z)`` are summed into each activation's ``inject`` for
        :meth:`backward`, and ``a''`` is freed. In a branch of linear layers all pairs
        go through one pass, stacked along a leading dimension (a single pair may
        already be such a stack)."""
        if self.vector and len(pairs) > 1:
            v = torch.stack([p[0] for p in pairs])
            w = torch.stack([p[1] for p in pairs])
            pairs = [(v, w)]
        grads: dict[int, Tensor] = {}
        last = len(self.steps) - 1
        for k, (v, w) in enumerate(pairs):
            final = k == len(pairs) - 1
            tangents = self._tangents(v)
            r = w
            for i in range(last, -1, -1):
                s = self.steps[i]
                if isinstance(s, _Act):
                    assert s.d2 is not None
                    if r.dim() > s.d2.dim():  # stacked pairs: sum over them
                        rt = torch.linalg.vecdot(r, tangents[i], dim=0)
                    else:
                        rt = r * tangents[i]
                    if s.inject is not None:
                        s.inject.addcmul_(rt, s.d2)
                    elif final:  # a'' is needed no more: its memory takes the term
                        s.inject = s.d2.mul_(rt)
                    else:
                        s.inject = rt * s.d2
                    if i > 0:
                        r = r * s.d1 if r is w else r.mul_(s.d1)
                else:
                    gw = s.weight_grad(r, tangents[i])
                    grads[i] = grads[i] + gw if i in grads else gw
                    if i > 0:
                        r = s.apply_t(r)
        for s in self.steps:
            if isinstance(s, _Act):
                s.d2 = None
        return grads

    def drop_pairs(self) -> None:
        """Forget the pairs' second-order terms: :meth:`backward` then gives ``g``'s own
        gradient only."""
        for s in self.steps:
            if isinstance(s, _Act):
                s.inject = None

    @torch.no_grad()
    def scale_pairs(self, scale: Tensor) -> None:
        """Scale the pairs' second-order terms (by the logdet's upstream gradient)."""
        for s in self.steps:
            if isinstance(s, _Act) and s.inject is not None:
                s.inject.mul_(scale)

    @torch.no_grad()
    def backward(
        self, c: Tensor, first: dict[int, Tensor], want_x: bool
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """One reverse pass for ``g``'s output gradient ``c`` and the injected
        second-order terms together (they share the value path):
        ``c <- c a'(z) + inject`` at every activation. Returns ``dL/dx`` (``None`` unless
        ``want_x``) and the gradients of :func:`branch_inputs` in their order: each
        layer's constrained weight (the ``first`` terms added) and bias, each learned
        activation's ``beta``."""
        grads: dict[tuple[int, str], Tensor] = {}
        beta_at: dict[int, Tensor] = {}  # activation index -> -<c_out, a>
        for i in range(len(self.steps) - 1, -1, -1):
            s = self.steps[i]
            if isinstance(s, _Act):
                if _learns(s.module):
                    assert s.out is not None
                    beta_at[i] = -torch.linalg.vecdot(c.flatten(), s.out.flatten())
                c = c * s.d1 if s.inject is None else s.inject.addcmul_(c, s.d1)
                s.inject = None
                if i in beta_at and s.z is not None:
                    beta_at[i] = beta_at[i] + torch.linalg.vecdot(c.flatten(), s.z.flatten())
            else:
                gw = s.weight_grad(c, s.inp)
                gb = None
                if s.module.bias is not None:
                    gb = c.sum(0) if not s.conv else c.sum((0, 2, 3))
                    grads[i, "b"] = gb
                nxt = self.steps[i + 1] if i + 1 < len(self.steps) else None
                if isinstance(nxt, _Act) and i + 1 in beta_at:
                    # <c_in, z> for z = W a + b is <W, dL/dW> + <b, dL/db>
                    dot = torch.linalg.vecdot(gw.flatten(), s.weight.flatten())
                    if gb is not None:
                        dot = dot + torch.linalg.vecdot(gb, s.module.bias.detach())
                    beta_at[i + 1] = beta_at[i + 1] + dot
                grads[i, "w"] = gw + first[i] if i in first else gw
                if i > 0 or want_x:
                    c = s.apply_t(c)
        for i, value in beta_at.items():
            beta, _ = self.steps[i].module.param_chain()  # type: ignore[union-attr, operator]
            grads[i, "beta"] = value / beta
        out: list[Tensor | None] = []
        for i, s in enumerate(self.steps):
            if isinstance(s, _Layer):
                out.append(grads[i, "w"])
                if s.module.bias is not None:
                    out.append(grads[i, "b"])
            elif _learns(s.module):
                out.append(grads.get((i, "beta")))
        return (c if want_x else None), out


def branch_inputs(g: nn.Sequential) -> list[Tensor]:
    """The tensors through which a branch's parameters act, with their graphs to the
    raw parameters: per layer the constrained weight and the bias, per learned
    activation ``beta``. :func:`neumann_branch` returns their gradients, and autograd
    carries them on through the normalization in the same backward pass."""
    out: list[Tensor] = []
    for m in g:
        if isinstance(m, (LipschitzLinear, LipschitzConv2d)):
            out.append(m.constrained_weight(shared=True))
            if m.bias is not None:
                out.append(m.bias)
        elif _learns(m):
            out.append(m.param_chain()[0])  # type: ignore[operator]
    return out


class _NeumannBranch(torch.autograd.Function):
    """``(g(x), logdet)`` of a residual branch with the closed-form logdet gradient.

    Forward: ``g`` without an autograd graph, the estimate with its pairs, and the
    pairs' first-order terms. Backward: one reverse pass of ``g`` carrying the output
    gradient and the logdet's second-order terms together, returning the gradients of
    :func:`branch_inputs`. The logdet's upstream gradient must be the same for every
    sample (a batch-mean or batch-sum loss).
    """

    @staticmethod
    def forward(ctx, g, x, estimate, scale, *inputs):  # type: ignore[no-untyped-def, override]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        lin = Linearization(g, x, second=True, inputs=list(inputs))
        value, pairs = estimate(lin, x)
        ctx.lin, ctx.first, ctx.scale = lin, lin.first_order(pairs), scale
        return lin.output, value

    @staticmethod
    def backward(ctx, grad_gx, grad_value):  # type: ignore[no-untyped-def, override]
        lin, first = ctx.lin, ctx.first
        del ctx.lin, ctx.first
        if grad_gx is None:  # only the logdet is used
            grad_gx = torch.zeros_like(lin.output)
        want_x = ctx.needs_input_grad[1]
        if grad_value is None:  # the logdet is not used: only g's own gradient
            lin.drop_pairs()
            grad_x, grads = lin.backward(grad_gx, {}, want_x)
            return (None, grad_x, None, None, *grads)
        up = in_forward.uniform_scale(grad_value) * ctx.scale
        if in_forward.reads_are_free(up) and float(up) != 0.0:
            # reading ``up`` is free on the CPU: divide ``c`` by it once and scale the
            # results, which leaves the pairs' terms untouched
            grad_x, grads = lin.backward(grad_gx / up, first, want_x)
            grads = [None if gr is None else gr * up for gr in grads]
            return (None, None if grad_x is None else grad_x * up, None, None, *grads)
        # on an accelerator the pairs' terms are scaled instead: no wait for the device
        lin.scale_pairs(up)
        grad_x, grads = lin.backward(grad_gx, {i: f * up for i, f in first.items()}, want_x)
        return (None, grad_x, None, None, *grads)


def neumann_branch(
    g: nn.Module,
    x: Tensor,
    estimate: Callable[[Linearization, Tensor], tuple[Tensor, list[tuple[Tensor, Tensor]]]],
    scale: float,
) -> tuple[Tensor, Tensor] | None:
    """``(g(x), value)`` where ``estimate(lin, x) = (value, [(v, w), ...])`` (``lin`` the
    branch's :class:`Linearization`, for its products) and the gradient of ``value`` is
    that of ``scale * sum_{(v, w)} sum_b w_b^T J v_b`` (``w`` fixed): the Neumann-series
    gradient of Residual Flows (Chen et al. 2019, Theorem 2), or the exact logdet's, in
    closed form. ``None`` when ``g`` is not supported (see :func:`linearize`)."""
    if not supported(g):
        return None
    if any(isinstance(m, LipschitzConv2d) and m.v.numel() == 0 for m in g):
        with torch.no_grad():  # first use: each convolution learns its input size
            g(x)
    return _NeumannBranch.apply(g, x, estimate, scale, *branch_inputs(g))  # type: ignore[no-untyped-call, no-any-return]


def linearize(g: nn.Module, x: Tensor) -> tuple[Tensor, Linearization | None]:
    """``(g(x), linearization)``; the linearization is ``None`` when ``g`` is not a plain
    sequence of Lipschitz layers and activations with known derivatives."""
    if not supported(g):
        return g(x), None
    lin = Linearization(g, x)  # type: ignore[arg-type]
    return lin.output, lin
