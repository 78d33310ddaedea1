"""Batched refresh and certification of groups of equal dense spectral-norm layers.

Dense layers under the spectral norm (``p = q = 2``, fixed) with equal weight shape,
dtype and device form a group (:func:`groups`); a group's power iterations run as one
batched product per step (each layer stopping on its own criterion, the same iterates
as one layer at a time), its certificates take one batched Cholesky test, and inside a
shared scope its rescaled weights come from one stacked computation
(:func:`rescaled_weights`). Every other layer does its own work
(:meth:`~resflow.layers.residual.spectral.LipschitzLayer.refresh`,
:meth:`~resflow.layers.residual.spectral.LipschitzLayer.certify`).

The layers are used through what they hold (:class:`NormLayer`); a layer class marks
itself as dense with ``dense_operator = True`` (its operator is ``F.linear(v, weight)``),
or as a stride-1 'same' convolution with ``conv_operator = True``; spectral-norm
convolutions of equal shape and image size form groups too (:func:`refresh_groups`):
one grouped convolution and one grouped transposed convolution per power-iteration
step, and one batched Cholesky test of their operators' Gram matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.residual.norms import NormOrder, Order
from resflow.layers.residual.spectral_bounds import (
    EXACT_LIMIT,
    MARGIN,
    one_thread,
    operator_gram,
    rounding_margin,
)


class NormLayer(Protocol):
    """What the batched work reads and writes on a Lipschitz layer (see
    :class:`~resflow.layers.residual.spectral.LipschitzLayer` for the meanings)."""

    dense_operator: bool
    weight: Tensor
    v: Tensor
    sigma: Tensor
    ratio: Tensor
    upper: Tensor
    coeff: float
    domain: Order
    codomain: Order
    atol: float
    rtol: float
    max_iter: int
    fixed_iter: int

    def _dims(self) -> tuple[int, int]: ...

    def refresh(
        self, atol: float | None = None, rtol: float | None = None, max_iter: int | None = None
    ) -> int: ...

    def certify(
        self,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        settled: tuple[Tensor, Tensor, Tensor, int] | None = None,
    ) -> int: ...


def _spectral(m: nn.Module) -> bool:
    """Whether ``m``'s norm is the fixed spectral norm (``p = q = 2``, not learned)."""
    return (
        not isinstance(m.domain, NormOrder)
        and not isinstance(m.codomain, NormOrder)
        and float(m.domain) == 2.0
        and float(m.codomain) == 2.0
    )


def spectral_dense(m: nn.Module) -> TypeGuard[NormLayer]:
    """Whether ``m`` is a dense Lipschitz layer under the spectral norm (``p = q = 2``,
    fixed): its ``sigma`` is ``r ||W v||_2 / ||v||_2``."""
    return getattr(m, "dense_operator", False) is True and _spectral(m)


def groups(layers: list[NormLayer]) -> list[list[NormLayer]]:
    """The layers whose norm work can be batched, in groups of two or more: dense,
    spectral norm (:func:`spectral_dense`), equal weight shape, dtype and device."""
    groups: dict[tuple[object, ...], list[NormLayer]] = {}
    for m in layers:
        if spectral_dense(m):
            key = (tuple(m.weight.shape), m.weight.dtype, m.weight.device)
            groups.setdefault(key, []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def spectral_conv(m: nn.Module) -> bool:
    """Whether ``m`` is a stride-1 'same' convolution under the spectral norm whose
    power-iteration vector exists (``conv_operator = True``, ``p = q = 2``, fixed)."""
    return getattr(m, "conv_operator", False) is True and _spectral(m) and m.v.numel() > 0


def refresh_groups(layers: list[NormLayer]) -> list[list[NormLayer]]:
    """The groups whose power iterations run batched: those of :func:`groups`, and the
    spectral-norm convolutions (:func:`spectral_conv`) of equal weight shape, image
    size, padding, dtype and device, in groups of two or more."""
    found: dict[tuple[object, ...], list[NormLayer]] = {}
    for m in layers:
        if spectral_conv(m):
            pad = tuple(m.padding)  # type: ignore[attr-defined]
            key = (tuple(m.weight.shape), tuple(m.v.shape), pad, m.weight.dtype, m.weight.device)
            found.setdefault(key, []).append(m)
    return groups(layers) + [g for g in found.values() if len(g) > 1]


def rescaled_weights(group: list[NormLayer]) -> Tensor:
    """The stacked ``W / max(1, sigma / c)`` of a group, as
    :meth:`LipschitzLayer.constrained_weight` computes each (in the weights'
    precision, also under autocast)."""
    w = torch.stack([m.weight for m in group])
    with torch.autocast(w.device.type, enabled=False):
        v = torch.cat([m.v for m in group])
        ratio = torch.stack([m.ratio for m in group])
        coeff = w.new_tensor([m.coeff for m in group])
        sigma = ratio * _estimates(_Dense(w), v)[1]
        return w / torch.clamp(sigma / coeff, min=1.0)[:, None, None]


@torch.no_grad()
def refresh_all(
    layers: list[NormLayer],
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
) -> int:
    """:meth:`LipschitzLayer.refresh` of every layer; returns the largest iteration
    count. Dense spectral-norm layers of equal shape run their power iterations
    together, one batched product per step for the whole group, each layer stopping
    on its own criterion (the same iterates as one at a time)."""
    return _per_group(
        layers,
        lambda m: m.refresh(atol=atol, rtol=rtol, max_iter=max_iter),
        lambda group: _refresh_group(group, atol, rtol, max_iter),
        lambda group: [group],
        refresh_groups,
    )


def _per_group(
    layers: list[NormLayer],
    one: Callable[[NormLayer], int],
    batched: Callable[[list[NormLayer]], int],
    parts: Callable[[list[NormLayer]], list[list[NormLayer]]],
    grouping: Callable[[list[NormLayer]], list[list[NormLayer]]] | None = None,
) -> int:
    """``one`` on every layer outside a group (``grouping``, default :func:`groups`),
    ``batched`` on every part of every group; the largest iteration count."""
    found = (grouping or groups)(layers)
    grouped = {id(m) for g in found for m in g}
    most = max((one(m) for m in layers if id(m) not in grouped), default=0)
    for group in found:
        for part in parts(group):
            most = max(most, batched(part))
    return most


def _unit(x: Tensor) -> Tensor:
    """Each row of ``x`` over its 2-norm (as ``dual(x, 2)`` per layer)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)


class _Dense:
    """The operators of stacked dense weights ``[n, out, in]`` on vectors ``[n, in]``."""

    def __init__(self, w: Tensor) -> None:
        self.w = w

    def op(self, v: Tensor) -> Tensor:
        return torch.bmm(self.w, v.unsqueeze(-1)).squeeze(-1)

    def op_t(self, u: Tensor) -> Tensor:
        return torch.bmm(u.unsqueeze(1), self.w).squeeze(1)

    def take(self, keep: Tensor) -> _Dense:
        return _Dense(self.w[keep])


class _Conv:
    """The operators of stacked stride-1 'same' convolutions ``[n, out, in, k, k]`` on
    flattened images ``[n, in * h * w]``: one grouped convolution (and one grouped
    transposed convolution, its adjoint) for the whole stack."""

    def __init__(self, w: Tensor, image: tuple[int, int, int], padding: tuple[int, int]) -> None:
        self.w, self.image, self.padding = w, image, padding
        n, out, cin, kh, kw = w.shape
        self.kernel = w.reshape(n * out, cin, kh, kw)

    def op(self, v: Tensor) -> Tensor:
        n, (c, h, w) = self.w.shape[0], self.image
        y = F.conv2d(v.view(1, n * c, h, w), self.kernel, padding=self.padding, groups=n)
        return y.view(n, -1)

    def op_t(self, u: Tensor) -> Tensor:
        n, (_, h, w) = self.w.shape[0], self.image
        out = self.w.shape[1]
        x = F.conv_transpose2d(
            u.view(1, n * out, h, w), self.kernel, padding=self.padding, groups=n
        )
        return x.view(n, -1)

    def take(self, keep: Tensor) -> _Conv:
        return _Conv(self.w[keep], self.image, self.padding)


Stack = _Dense | _Conv


def _stack(group: list[NormLayer]) -> Stack:
    """The batched operators of a group (:func:`refresh_groups`)."""
    w = torch.stack([m.weight for m in group])
    if w.dim() == 3:
        return _Dense(w)
    m = group[0]
    return _Conv(w, tuple(m.v.shape[1:]), tuple(m.padding))  # type: ignore[attr-defined, arg-type]


def _estimates(ops: Stack, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(W v, ||W v|| / ||v||)`` for every stacked operator and its vector (a row)."""
    wv = ops.op(v)
    norm_v = torch.linalg.vector_norm(v, dim=1).clamp_min(1e-30)
    return wv, torch.linalg.vector_norm(wv, dim=1) / norm_v


def _power_steps(ops: Stack, wv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One power-iteration step of every stacked layer (``_power_step`` per layer)."""
    v = _unit(ops.op_t(_unit(wv)))
    return (v, *_estimates(ops, v))


def settle(
    power_step: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    v: Tensor,
    wv: Tensor,
    sigma: Tensor,
    atol: float,
    rtol: float,
    max_iter: int,
    first_run: int,
) -> tuple[Tensor, Tensor, int]:
    """One layer's adaptive power iteration from ``v`` (``wv = W v``, last estimate
    ``sigma``): ``(v, sigma, iterations)`` at the first iteration where
    ``|sigma_k - sigma_{k-1}| <= atol + rtol sigma_k``, or after ``max_iter``. The rule
    is evaluated on the device every iteration (in the weights' precision) and read once
    per run of iterations (``first_run``, then doubling), the state taken from the
    iteration it stopped at: the result of reading it every iteration, with a few
    iterations run past it unread."""
    it, chunk = 0, max(1, first_run)
    while it < max_iter:
        states, flags = [], []
        for _ in range(min(chunk, max_iter - it)):
            v, wv, new = power_step(v, wv)
            flags.append((new - sigma).abs() <= new * rtol + atol)
            states.append((v, new))
            sigma = new
        it += len(states)
        done = torch.stack(flags)
        at = int(torch.where(done.any(), done.to(torch.uint8).argmax() + 1, 0))  # one read
        if at:  # the run's first iteration that met the rule (1-based)
            v, sigma = states[at - 1]
            return v, sigma, it - len(states) + at
        chunk *= 2
    return v, sigma, it


def _fixed_group(group: list[NormLayer], v: Tensor, sigma: Tensor, steps: int) -> int:
    """Exactly ``steps`` batched power iterations of the group, reading nothing on the
    host (the layers' ``fixed_iter``)."""
    ops = _stack(group)
    wv = ops.op(v)
    for _ in range(steps):
        v, wv, sigma = _power_steps(ops, wv)
    for i, m in enumerate(group):
        m.v.copy_(v[i].view_as(m.v))
        m.sigma.copy_(sigma[i])
    return steps


def _refresh_group(
    group: list[NormLayer], atol: float | None, rtol: float | None, max_iter: int | None
) -> int:
    out_v = torch.cat([m.v.reshape(1, -1) for m in group])  # [n, in]
    out_sigma = torch.stack([m.sigma for m in group])
    # after a training step most layers settle in two steps while a few with close
    # singular values take tens (the 2-D paper model's 300 layers: up to 30), so the
    # stack shrinks to the running layers whenever half of it has stopped (stopped
    # layers still in it iterate on, unread); ``rows`` are the stack's places in the group
    fixed = {m.fixed_iter for m in group}
    if atol is None and rtol is None and max_iter is None and len(fixed) == 1 and 0 not in fixed:
        return _fixed_group(group, out_v, out_sigma, fixed.pop())
    limits = [m.max_iter if max_iter is None else max_iter for m in group]
    live = [i for i, n in enumerate(limits) if n > 0]
    if not live:  # no iterations allowed: nothing changes
        return 0
    rows = torch.tensor(live, dtype=torch.long, device=out_v.device)
    ops = _stack([group[i] for i in live])
    v, sigma = out_v[rows], out_sigma[rows]

    def each(given: float | None, name: str) -> Tensor:
        """The running layers' ``name`` (or ``given``), in the weights' precision as
        refresh() uses it."""
        return v.new_tensor([getattr(group[i], name) if given is None else given for i in live])

    tol_a, tol_r, limit = each(atol, "atol"), each(rtol, "rtol"), each(max_iter, "max_iter")
    wv = ops.op(v)
    # each layer's rule is evaluated on the device every iteration, and once per run of
    # iterations (2, 4, 8, ...) each layer that stopped in it takes its state from the
    # iteration it stopped at and the number still running is read: the same result as
    # reading the rule every iteration
    stopped_at = torch.zeros_like(rows)  # 0: still running
    it, running, chunk, most = 0, len(live), 2, 0
    while running:
        vs, sigmas, flags = [], [], []
        for _ in range(chunk):
            it += 1
            v, wv, sigma_new = _power_steps(ops, wv)
            flags.append(((sigma_new - sigma).abs() <= sigma_new * tol_r + tol_a) | (limit <= it))
            sigma = sigma_new
            vs.append(v)
            sigmas.append(sigma)
        done = torch.stack(flags)  # [run, rows]
        first = done.to(torch.uint8).argmax(0)  # the run's first iteration that stopped
        stops = done.any(0) & (stopped_at == 0)
        pick = torch.arange(len(first), device=first.device)
        out_v[rows] = torch.where(stops[:, None], torch.stack(vs)[first, pick], out_v[rows])
        out_sigma[rows] = torch.where(stops, torch.stack(sigmas)[first, pick], out_sigma[rows])
        stopped_at = torch.where(stops, it - chunk + 1 + first, stopped_at)
        running, last = torch.stack(
            [(stopped_at == 0).sum(), stopped_at.max()]
        ).tolist()  # one read
        most = max(most, last)
        chunk *= 2
        if running and 2 * running <= len(rows):  # on the running layers only
            keep = (stopped_at == 0).nonzero().squeeze(1)
            rows, ops, v, wv, sigma = rows[keep], ops.take(keep), v[keep], wv[keep], sigma[keep]
            tol_a, tol_r, limit = tol_a[keep], tol_r[keep], limit[keep]
            stopped_at = stopped_at[keep]
    for i, m in enumerate(group):
        m.v.copy_(out_v[i].view_as(m.v))
        m.sigma.copy_(out_sigma[i])
    return most


@torch.no_grad()
def certify_all(
    layers: list[NormLayer],
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
) -> int:
    """:meth:`LipschitzLayer.certify` of every layer; returns the largest iteration
    count. Dense spectral-norm layers of equal shape, and convolutions of equal shape
    and image size (:func:`refresh_groups`), settle their power iterations together
    (each on its own criterion, as in :func:`refresh_all`) and take the Cholesky test
    of their bounds in one batched factorization; a layer the batched
    test leaves open (its bound not confirmed, a zero weight or a null-space vector)
    is certified on its own from where it started."""
    return _per_group(
        layers,
        lambda m: m.certify(atol=atol, rtol=rtol, max_iter=max_iter),
        lambda group: _certify_group(group, atol, rtol, max_iter),
        _chunks,
        refresh_groups,
    )


def _chunks(group: list[NormLayer]) -> list[list[NormLayer]]:
    """A group in parts of at most :data:`CPU_CHUNK` layers on the CPU, where their
    float64 Gram matrices then stay in cache (faster than whole or one at a time; the
    power-iteration refresh gains nothing from parts); whole on an accelerator, where
    each operation and each read of the device costs more than the arithmetic."""
    if group[0].weight.device.type != "cpu":
        return [group]
    return [group[k : k + CPU_CHUNK] for k in range(0, len(group), CPU_CHUNK)]


CPU_CHUNK = 16


def _certify_group(
    group: list[NormLayer], atol: float | None, rtol: float | None, max_iter: int | None
) -> int:
    """:func:`certify_all` for one group (see :meth:`LipschitzLayer.certify` and
    :meth:`LipschitzLayer._gap_closing_power_iteration`, whose quick path this is)."""
    conv = group[0].weight.dim() == 4
    if min(group[0]._dims()) > EXACT_LIMIT:  # no exact test: each on its own
        return max(m.certify(atol=atol, rtol=rtol, max_iter=max_iter) for m in group)
    with torch.no_grad():
        ops = _stack(group)
    w = ops.w  # [n, out, in] or [n, out, in, k, k]
    eps = torch.finfo(w.dtype).eps
    tol_r = w.new_tensor(
        [max(m.rtol if rtol is None else rtol, 64 * eps + 4e-8) for m in group],
        dtype=torch.float64,
    )
    limit = w.new_tensor([m.max_iter if max_iter is None else max_iter for m in group])
    v = torch.cat([m.v.reshape(1, -1) for m in group])  # [n, in]
    wv, sigma = _estimates(ops, v)
    # the cases certify() treats apart go there: a zero weight, v in the null space, no
    # iterations allowed
    apart = (w.flatten(1).abs().amax(1) == 0) | (sigma <= 0) | (limit <= 0)
    iters = torch.zeros_like(limit)
    # settle: each layer until its estimate moves < rtol / 4; the products run on the
    # layers still settling only (a slow one would otherwise keep the whole part busy)
    work = (~apart).nonzero().squeeze(1)
    # a copy: in float64 .double() would alias sigma, which the loop writes
    ops_work, prev = ops.take(work), sigma.to(torch.float64, copy=True)
    while work.numel():
        iters[work] += 1
        v_new, wv_new, new = _power_steps(ops_work, wv[work])
        v[work], wv[work], sigma[work] = v_new, wv_new, new
        moved = (new.double() - prev[work]).abs()
        prev[work] = new.double()
        going = (moved > 0.25 * tol_r[work] * new.double()) & (iters[work] < limit[work])
        if not bool(going.all()):
            work, ops_work = work[going], ops_work.take(going)
    guess = sigma.double() * (1.0 + tol_r)
    if conv:  # each convolution's operator Gram matrix (equal sizes in a group)
        grams = [operator_gram(m.weight, tuple(m.v.shape[2:]), tuple(m.padding)) for m in group]  # type: ignore[attr-defined]
        gram = torch.stack(grams)  # type: ignore[arg-type]
    else:
        m64 = w.double()
        gram = m64.mT @ m64 if w.shape[-1] <= w.shape[-2] else m64 @ m64.mT
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=w.device)
    with one_thread():
        info = torch.linalg.cholesky_ex(guess[:, None, None] ** 2 * eye - gram)[1]
    holds = (info == 0) & ~apart
    _, est = _estimates(ops, v)
    margin = rounding_margin(w.dtype, min(group[0]._dims()))
    upper = guess * (1.0 + MARGIN)
    ratio = torch.where(est > 0, upper * (1.0 + margin) / est.double(), 1.0).clamp_min(1.0)
    most = 0
    # what each layer needs next, in one read
    flags, aside, counts = torch.stack([holds.double(), apart.double(), iters.double()]).tolist()
    for i, m in enumerate(group):
        if flags[i]:
            m.v.copy_(v[i].view_as(m.v))
            m.sigma.copy_(sigma[i])
            m.upper.copy_(upper[i])
            m.ratio.copy_(ratio[i])
            it = int(counts[i])
        elif aside[i]:  # from its own start, on its own
            it = m.certify(atol=atol, rtol=rtol, max_iter=max_iter)
        else:  # not confirmed: on its own from the settled state
            out_shape = (1, w.shape[1], *m.v.shape[2:]) if conv else (1, -1)
            state = (v[i].view_as(m.v), wv[i].view(out_shape), sigma[i], int(counts[i]))
            it = m.certify(atol=atol, rtol=rtol, max_iter=max_iter, settled=state)
        most = max(most, it)
    return most
