"""The exact log-determinant of a dense residual branch as two pure functions.

For vectors of a few dimensions (the 2-D models: ``g = L_n o a o ... o a o L_1`` with
dense Lipschitz layers and LipSwish activations) the step is many small products and
elementwise operations per block. Here :class:`_NeumannBranch`'s exact-logdet work
(see :mod:`resflow.layers.residual.jacobian`) is written as two functions of plain
tensor lists, with the same arithmetic:

* :func:`exact_forward`: each layer's spectral rescaling ``W / max(1, sigma / c)``,
  ``g(x)``, the ``d`` tangents ``J e_j`` in one stacked pass, the logdet with
  ``(I + J)^{-T}`` in closed form, and the pairs' cotangent pass giving the
  first-order weight terms and the second-order terms ``r t a''``;
* :func:`exact_backward`: one reverse pass for the output gradient and the
  second-order terms together, the bias and ``beta`` gradients, and the raw weights'
  gradients through the rescaling.

With compilation on (:func:`~resflow.layers.residual.kernels.set_compile`) each is one
``torch.compile`` graph, its elementwise chains fused and its per-operation overhead
gone; otherwise the same functions run op by op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.residual.activations import LipSwish, lipswish_derivatives
from resflow.layers.residual.in_forward import uniform_scale
from resflow.layers.residual.kernels import fusable
from resflow.layers.residual.lipschitz_layers import LipschitzLinear
from resflow.layers.residual.logdet import logdet_and_inverse_t
from resflow.layers.residual.refresh import spectral_dense

#: the largest input dimension taken here (the stacked tangents are d times the batch)
MAX_DIM = 8


def supported(g: nn.Module, x: Tensor) -> bool:
    """Whether ``g`` is dense spectral-norm layers (with bias) alternating with LipSwish
    activations, ending with a layer (one activation may come first), on inputs
    ``[batch, d]`` with ``d <= MAX_DIM``."""
    if x.dim() != 2 or x.shape[1] > MAX_DIM or not isinstance(g, nn.Sequential):
        return False
    mods = list(g)
    if mods and type(mods[0]) is LipSwish:
        mods = mods[1:]
    if len(mods) % 2 == 0:
        return False
    for i, m in enumerate(mods):
        want = LipschitzLinear if i % 2 == 0 else LipSwish
        if type(m) is not want or (i % 2 == 0 and (m.bias is None or not spectral_dense(m))):
            return False
    return True


def _lipswish(z: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(a(z), a'(z), a''(z))`` of LipSwish: the activation's own formulas, unfused
    here so that a compiled pass fuses them with its neighbours."""
    return lipswish_derivatives.fn(z, beta)  # type: ignore[no-any-return]


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (``a`` may have a leading batch dimension), with products onto a few
    columns (``b: [k, n <= MAX_DIM]``, the branch's first and last layers) laid out as
    the matrix-product kernel runs them fast: with ``b^T`` contiguous, and ``c^T @ x``
    as ``(x^T c)^T``."""
    if b.shape[-1] > MAX_DIM or a.shape[-1] <= MAX_DIM:
        return a @ b
    if a.dim() == 2 and a.stride(0) == 1:  # a transposed matrix: as (b^T a^T)^T
        return (b.t() @ a.t()).t()
    return a @ b.t().contiguous().t()


Norms = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


def _constrained(
    weights: list[Tensor], vs: list[Tensor], ratios: list[Tensor], coeffs: tuple[float, ...]
) -> tuple[list[Tensor], Norms]:
    """Each layer's ``W / max(1, sigma / c)`` with ``sigma = r ||W v|| / ||v||``, as
    :meth:`~resflow.layers.residual.spectral.LipschitzLayer.constrained_weight`
    computes it, here per layer inside the pass (the weight is read once, while in
    cache, instead of rescaling every layer's weight in one stacked pass over memory);
    with what :func:`_raw_grads` needs."""
    out: list[Tensor] = []
    scales, gains, wvs, units = [], [], [], []
    for w, v, ratio, coeff in zip(weights, vs, ratios, coeffs):
        wv = F.linear(v, w)
        norm_v = torch.linalg.vector_norm(v).clamp_min(1e-30)
        norm_wv = torch.linalg.vector_norm(wv)
        sigma = ratio * (norm_wv / norm_v)
        scale = torch.clamp(sigma / coeff, min=1.0)
        out.append(w / scale)
        scales.append(scale)
        # d sigma / dW = (r / ||W v||) (W v)^T v / ||v||, where the clamp passes it on
        gains.append(
            torch.where(sigma / coeff >= 1.0, ratio / norm_wv.clamp_min(1e-30), 0.0) / coeff
        )
        wvs.append(wv)
        units.append(v / norm_v)
    return out, (out, scales, gains, wvs, units)


def _raw_grads(gws: list[Tensor], norms: Norms) -> list[Tensor]:
    """The raw weights' gradients from the rescaled weights' ``gws``: ``g / s`` and,
    through ``s = sigma / c`` where the clamp is not active, ``-<g, W / s> / s`` times
    ``d(sigma / c) / dW``."""
    out: list[Tensor] = []
    for g, wc, scale, gain, wv, unit in zip(gws, *norms):
        g_scale = -(g * wc).sum() / scale
        out.append(g / scale + (g_scale * gain) * wv.t() * unit)
    return out


Saved = tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], Norms]


def _exact_forward(
    x: Tensor,
    raw: list[Tensor],
    vs: list[Tensor],
    ratios: list[Tensor],
    coeffs: tuple[float, ...],
    biases: list[Tensor],
    betas: list[Tensor],
    pre: bool,
) -> tuple[Tensor, Tensor, Saved]:
    """``(g(x), logdet, saved)`` for layers of raw weights ``raw`` (rescaled here, see
    :func:`_constrained`) and ``biases``, with an activation of ``betas[k]`` after every
    layer but the last (and, with ``pre``, ``betas[0]`` before the first). ``saved``:
    ``x``; per layer its input and the pairs' first-order weight gradient; per
    activation ``a'`` and the pairs' second-order term ``sum_j r_j t_j a''``; the
    rescaling's terms."""
    weights, norms = _constrained(raw, vs, ratios, coeffs)
    n = len(weights)
    b, d = x.shape
    acts = betas[1:] if pre else betas
    d1s, d2s, act_tangents, inputs, layer_tangents = [], [], [], [], []
    h = x
    basis = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1)  # [j, 1, i]
    t = basis
    if pre:
        act_tangents.append(basis)
        h, d1, d2 = _lipswish(x, betas[0])
        d1s.append(d1)
        d2s.append(d2)
        t = basis * d1
    for i in range(n):
        inputs.append(h)
        layer_tangents.append(t)
        # written as a difference so that the compiler adds the bias in the next fused
        # kernel instead of rewriting the pair as ``addmm`` (one more pass: on the CPU
        # ``addmm`` first copies the bias into every row of its output)
        h = _mm(h, weights[i].t()) - biases[i].neg()
        # without a first activation the tangents after the first layer are its columns
        t = weights[0].t().unsqueeze(1) if i == 0 and not pre else _mm(t, weights[i].t())
        if i < n - 1:
            act_tangents.append(t)
            h, d1, d2 = _lipswish(h, acts[i])
            d1s.append(d1)
            d2s.append(d2)
            t = t * d1
    jac = t.permute(1, 2, 0) + torch.eye(d, dtype=x.dtype, device=x.device)  # [b, i, j]
    logdet, inv_t = logdet_and_inverse_t(jac)
    r = inv_t.permute(2, 0, 1)  # r[j] = (I + J)^{-T} e_j, per sample
    first: list[Tensor] = [x] * n
    injects: list[Tensor] = [x] * len(d1s)
    off = 1 if pre else 0  # activation k + off follows layer k
    for i in range(n - 1, -1, -1):
        t_in = layer_tangents[i]
        if i == 0 and not pre:  # the tangents entering the first layer are the e_j
            first[0] = r.sum(1).t()
            break
        first[i] = _mm(r.reshape(-1, r.shape[-1]).t(), t_in.expand(d, b, -1).reshape(d * b, -1))
        r = _mm(r, weights[i])
        k = i - 1 + off  # the activation before layer i
        injects[k] = (r * act_tangents[k]).sum(0) * d2s[k]
        r = r * d1s[k]
    return h, logdet, (x, inputs, first, d1s, injects, norms)


def _exact_backward(
    c: Tensor, up: Tensor, biases: list[Tensor], betas: list[Tensor], pre: bool, saved: Saved
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """``(dL/dx, raw weight grads, bias grads, beta grads)`` for the output gradient
    ``c`` and the logdet's upstream gradient ``up`` (a scalar tensor, the same for
    every sample; 0 where the logdet is not used)."""
    x, inputs, first, d1s, injects, norms = saved
    weights = norms[0]
    n = len(weights)
    off = 1 if pre else 0
    gws: list[Tensor] = [c] * n
    gbs: list[Tensor] = [c] * n
    gbetas: list[Tensor] = [c] * len(betas)
    for i in range(n - 1, -1, -1):
        gw = _mm(c.t(), inputs[i])
        gb = c.sum(0)
        gws[i] = gw + up * first[i]
        gbs[i] = gb
        if i < n - 1:  # the activation after this layer: <c_in, z> = <W, dW> + <b, db>
            k = i + off
            gbetas[k] = (gbetas[k] + (gw * weights[i]).sum() + (gb * biases[i]).sum()) / betas[k]
        c = _mm(c, weights[i])
        if i > 0 or pre:
            k = i - 1 + off  # the activation before layer i
            gbetas[k] = -(c * inputs[i]).sum()  # -<c_out, a>
            c = c * d1s[k] + up * injects[k]
    if pre:  # no layer before it: <c_in, z> directly
        gbetas[0] = (gbetas[0] + (c * x).sum()) / betas[0]
    return c, _raw_grads(gws, norms), gbs, gbetas


exact_forward = fusable(_exact_forward)
exact_backward = fusable(_exact_backward)


class _ExactBranch(torch.autograd.Function):
    """``(g(x), logdet)`` of a supported branch (see :func:`supported`) with the exact
    logdet's closed-form gradient. ``norms``: per layer the power-iteration vector, the
    ratio ``r`` and the bound ``c`` (no gradients); the inputs after it are the
    branch's parameters in its order: each layer's raw weight and bias, each
    activation's ``beta``."""

    @staticmethod
    def forward(ctx, x, pre, n_layers, norms, *params):  # type: ignore[no-untyped-def, override]
        ctx.set_materialize_grads(False)
        weights, biases, betas = _split(params, pre, n_layers)
        gx, logdet, saved = exact_forward(x, weights, *norms, biases, betas, pre)
        ctx.pre, ctx.saved = pre, (biases, betas, saved)
        return gx, logdet

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):  # type: ignore[no-untyped-def, override]
        biases, betas, saved = ctx.saved
        del ctx.saved
        if grad_gx is None:  # only the logdet is used
            grad_gx = torch.zeros_like(saved[0])  # g maps R^d to R^d
        if grad_logdet is None:  # the logdet is not used: only g's own gradient
            up = grad_gx.new_zeros(())
        else:
            up = uniform_scale(grad_logdet)
        gx, gws, gbs, gbetas = exact_backward(grad_gx, up, biases, betas, ctx.pre, saved)
        grads: list[Tensor | None] = [gbetas[0]] if ctx.pre else []
        off = 1 if ctx.pre else 0
        for i in range(len(gws)):
            grads += [gws[i], gbs[i]]
            if i < len(gws) - 1:
                grads.append(gbetas[i + off])
        return (gx if ctx.needs_input_grad[0] else None, None, None, None, *grads)


def _split(
    params: tuple[Tensor, ...], pre: bool, n: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The branch's parameters in its order into weights, biases and betas."""
    rest = list(params[1:] if pre else params)
    weights = [rest[3 * i] for i in range(n)]
    biases = [rest[3 * i + 1] for i in range(n)]
    betas = ([params[0]] if pre else []) + [rest[3 * i + 2] for i in range(n - 1)]
    return weights, biases, betas


def exact_branch(g: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(g(x), log|det(I + J_g(x))|)`` with the closed-form gradient, for a branch that
    :func:`supported` accepts. Each layer's weight is rescaled inside the pass (see
    :func:`_constrained`)."""
    params: list[Tensor] = []
    vs: list[Tensor] = []
    ratios: list[Tensor] = []
    coeffs: list[float] = []
    for m in g:
        if isinstance(m, LipschitzLinear):
            params += [m.weight, m.bias]
            vs.append(m.v)
            ratios.append(m.ratio)
            coeffs.append(float(m.coeff))
        else:
            beta = m.param_chain()[0]
            params.append(beta if beta.requires_grad else beta.detach())
    pre = type(g[0]) is LipSwish
    norms = (vs, ratios, tuple(coeffs))
    return _ExactBranch.apply(x, pre, len(vs), norms, *params)  # type: ignore[no-untyped-call, no-any-return]
