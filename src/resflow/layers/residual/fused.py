"""The log-determinant of a dense residual branch on small vectors as two pure functions.

For vectors of a few dimensions (the 2-D models: ``g = L_n o a o ... o a o L_1`` with
dense Lipschitz layers and LipSwish activations) the step is many small products and
elementwise operations per block. Here the branch, its ``d x d`` Jacobians and every
gradient are written as two functions of plain tensor lists:

* :func:`fused_forward`: each layer's spectral rescaling ``W / max(1, sigma / c)``,
  ``g(x)``, and the ``d`` tangents ``J e_j`` in one stacked pass;
* a *head* turns the Jacobians into the logdet and its cotangent ``dlogdet / dJ``:
  the exact ``log|det(I + J)|`` with ``(I + J)^{-T}`` in closed form
  (:func:`exact_head`), or the power series with its roulette, whose products
  ``J^k v`` are ``d x d`` ones
  (:func:`~resflow.layers.residual.logdet.series_from_jacobian`; the cotangent of the
  series itself or of the Neumann gradient estimator);
* :func:`fused_backward`: one reverse pass for the output gradient and, per column,
  the cotangent of the tangents, which gives the first-order weight terms and the
  second-order terms ``r t a''``; the bias and ``beta`` gradients, and the raw
  weights' gradients through the rescaling.

Each sample's upstream gradient scales its own cotangent in the backward pass, so the
path needs no batch-mean loss and reads nothing on the host. With compilation on
(:func:`~resflow.layers.residual.kernels.set_compile`) each pass is one
``torch.compile`` graph of fixed shapes (the head, whose number of series terms varies,
stays outside); otherwise the same functions run op by op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from resflow.layers.residual.activations import LipSwish, lipswish_derivatives
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


def _fused_forward(
    x: Tensor,
    raw: list[Tensor],
    vs: list[Tensor],
    ratios: list[Tensor],
    coeffs: tuple[float, ...],
    biases: list[Tensor],
    betas: list[Tensor],
    pre: bool,
) -> tuple[Tensor, Tensor, Saved]:
    """``(g(x), J, saved)`` for layers of raw weights ``raw`` (rescaled here, see
    :func:`_constrained`) and ``biases``, with an activation of ``betas[k]`` after every
    layer but the last (and, with ``pre``, ``betas[0]`` before the first); ``J``:
    ``[batch, i, j] = dg_i / dx_j`` from the ``d`` tangents ``J e_j`` of one stacked
    pass. ``saved``: ``x``; per layer its input; per activation the tangents entering
    it, ``a'`` and ``a''``; the rescaling's terms."""
    weights, norms = _constrained(raw, vs, ratios, coeffs)
    n = len(weights)
    b, d = x.shape
    acts = betas[1:] if pre else betas
    d1s, d2s, act_tangents, inputs = [], [], [], []
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
    jac = t.expand(d, b, d).permute(1, 2, 0)  # [b, i, j]
    return h, jac, (x, inputs, act_tangents, d1s, d2s, norms)


def _fused_backward(
    c: Tensor,
    cot: Tensor | None,
    biases: list[Tensor],
    betas: list[Tensor],
    pre: bool,
    saved: Saved,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """``(dL/dx, raw weight grads, bias grads, beta grads)`` for the output gradient
    ``c`` and the cotangent ``cot`` of ``J`` (``[batch, i, j]``: the logdet's cotangent
    times each sample's upstream gradient; ``None`` where the logdet is not used).

    Two reverse passes in one loop: ``c`` through ``g``, and per column ``j`` the
    cotangent ``r_j`` of the tangent ``J e_j``, which gives the first-order weight terms
    ``r^T t`` and the second-order terms ``sum_j r_j t_j a''`` added to ``c``."""
    x, inputs, act_tangents, d1s, d2s, norms = saved
    weights = norms[0]
    n = len(weights)
    d = x.shape[1]
    off = 1 if pre else 0
    r = cot.permute(2, 0, 1) if cot is not None else None  # r[j] = cotangent of J e_j
    gws: list[Tensor] = [c] * n
    gbs: list[Tensor] = [c] * n
    gbetas: list[Tensor] = [c] * len(betas)
    for i in range(n - 1, -1, -1):
        gw = _mm(c.t(), inputs[i])
        gb = c.sum(0)
        k = i - 1 + off  # the activation before layer i
        gws[i] = gw
        if r is not None:
            if k < 0:  # the tangents entering the first layer are the e_j
                gws[i] = gw + r.sum(1).t()
            else:
                t_in = (act_tangents[k] * d1s[k]).expand(d, *inputs[i].shape)
                first = _mm(r.reshape(-1, r.shape[-1]).t(), t_in.reshape(-1, t_in.shape[-1]))
                gws[i] = gw + first
        gbs[i] = gb
        if i < n - 1:  # the activation after this layer: <c_in, z> = <W, dW> + <b, db>
            j = i + off
            gbetas[j] = (gbetas[j] + (gw * weights[i]).sum() + (gb * biases[i]).sum()) / betas[j]
        c = _mm(c, weights[i])
        if k >= 0:
            gbetas[k] = -(c * inputs[i]).sum()  # -<c_out, a>
            c = c * d1s[k]
            if r is not None:
                r = _mm(r, weights[i])
                c = c + (r * act_tangents[k]).sum(0) * d2s[k]
                r = r * d1s[k]
    if pre:  # no layer before it: <c_in, z> directly
        gbetas[0] = (gbetas[0] + (c * x).sum()) / betas[0]
    return c, _raw_grads(gws, norms), gbs, gbetas


fused_forward = fusable(_fused_forward)
fused_backward = fusable(_fused_backward)

#: the logdet and its cotangent from the Jacobians ``[batch, d, d]``
Head = Callable[[Tensor], tuple[Tensor, Tensor]]


def exact_head(jac: Tensor) -> tuple[Tensor, Tensor]:
    """``log|det(I + J)|`` and its cotangent ``(I + J)^{-T}``."""
    return logdet_and_inverse_t(jac + torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device))


class _FusedBranch(torch.autograd.Function):
    """``(g(x), logdet)`` of a supported branch (see :func:`supported`), the logdet
    from ``head`` (exact or series), with the closed-form gradient of either. ``norms``:
    per layer the power-iteration vector, the ratio ``r`` and the bound ``c`` (no
    gradients); the inputs after it are the branch's parameters in its order: each
    layer's raw weight and bias, each activation's ``beta``. Each sample's upstream
    gradient scales its own cotangent: no batch-mean loss is assumed."""

    @staticmethod
    def forward(ctx, x, pre, n_layers, norms, head, *params):  # type: ignore[no-untyped-def, override]
        ctx.set_materialize_grads(False)
        weights, biases, betas = _split(params, pre, n_layers)
        gx, jac, saved = fused_forward(x, weights, *norms, biases, betas, pre)
        logdet, cot = head(jac.detach())
        # saved as autograd saves tensors: freed once this node has run, kept where the
        # graph is retained (repeated backward passes, e.g. a brute-force Jacobian)
        leaves, ctx.spec = tree_flatten((biases, betas, saved, cot))
        ctx.save_for_backward(*leaves)
        ctx.pre = pre
        return gx, logdet

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):  # type: ignore[no-untyped-def, override]
        biases, betas, saved, cot = tree_unflatten(list(ctx.saved_tensors), ctx.spec)
        if grad_gx is None:  # only the logdet is used
            grad_gx = torch.zeros_like(saved[0])  # g maps R^d to R^d
        if grad_logdet is not None:
            cot = cot * grad_logdet.view(-1, 1, 1)
        else:  # the logdet is not used: only g's own gradient
            cot = None
        gx, gws, gbs, gbetas = fused_backward(grad_gx, cot, biases, betas, ctx.pre, saved)
        grads: list[Tensor | None] = [gbetas[0]] if ctx.pre else []
        off = 1 if ctx.pre else 0
        for i in range(len(gws)):
            grads += [gws[i], gbs[i]]
            if i < len(gws) - 1:
                grads.append(gbetas[i + off])
        return (gx if ctx.needs_input_grad[0] else None, None, None, None, None, *grads)


def _split(
    params: tuple[Tensor, ...], pre: bool, n: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The branch's parameters in its order into weights, biases and betas."""
    rest = list(params[1:] if pre else params)
    weights = [rest[3 * i] for i in range(n)]
    biases = [rest[3 * i + 1] for i in range(n)]
    betas = ([params[0]] if pre else []) + [rest[3 * i + 2] for i in range(n - 1)]
    return weights, biases, betas


def fused_branch(g: nn.Sequential, x: Tensor, head: Head = exact_head) -> tuple[Tensor, Tensor]:
    """``(g(x), logdet)`` with the closed-form gradient, for a branch that
    :func:`supported` accepts; ``head`` turns the Jacobians into the logdet and its
    cotangent (:func:`exact_head`, or a series estimate, see
    :func:`~resflow.layers.residual.logdet.series_from_jacobian`). Each layer's weight
    is rescaled inside the pass (see :func:`_constrained`)."""
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
    return _FusedBranch.apply(x, pre, len(vs), norms, head, *params)  # type: ignore[no-untyped-call, no-any-return]
