"""Backward-in-forward (Residual Flows, Chen et al. 2019, §3.2): the logdet's gradient
computed inside the forward pass and its graph freed at once, which needs the same
upstream gradient for every sample's logdet (a batch-mean or batch-sum loss).

This module holds that requirement's check (:func:`check_uniform`, and
:func:`uniform_scale`, which on an accelerator defers it to the end of the backward
pass) and the generic autograd version of the trick (:func:`grad_in_forward`); the
closed-form versions are :mod:`resflow.layers.residual.jacobian` and
:mod:`resflow.layers.residual.fused`.

>>> import torch
>>> float(check_uniform(torch.tensor([0.5, 0.5, 0.5])))
0.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from resflow.value_checks import deferring, require

NOT_UNIFORM = (
    "backward-in-forward needs the same upstream gradient for every sample's "
    "logdet (a batch-mean or batch-sum loss); got per-sample weights. "
    "Use LogdetEstimator(grad_in_forward=False) for weighted losses."
)


def check_uniform(grad: Tensor) -> Tensor:
    scale = grad[0]
    if not torch.allclose(grad, scale.expand_as(grad), rtol=1e-4, atol=1e-12):
        raise RuntimeError(NOT_UNIFORM)
    return scale


def reads_are_free(t: Tensor) -> bool:
    """Whether reading ``t`` on the host costs no wait for a device (CPU tensors)."""
    return t.device.type == "cpu"


_pending: list[Tensor] = []  # checks queued in the running backward pass


def uniform_scale(grad: Tensor) -> Tensor:
    """``grad[0]``, once every sample's logdet is known to get the same upstream
    gradient. Inside :func:`resflow.value_checks.deferred` (the trainer's steps) the
    check joins the step's other checks, read with them; else on the CPU it is checked
    at once (:func:`check_uniform`), and on an accelerator it is queued on the device
    and read once, when the backward pass ends -- one wait per backward, not one per
    residual block."""
    if not deferring() and reads_are_free(grad):
        return check_uniform(grad)
    scale = grad[0]
    bad = ~torch.isclose(grad, scale.expand_as(grad), rtol=1e-4, atol=1e-12).all()
    if deferring():
        require(bad, lambda: RuntimeError(NOT_UNIFORM))
        return scale
    if not _pending:
        torch.autograd.Variable._execution_engine.queue_callback(_verify_pending)
    _pending.append(bad)
    return scale


def _verify_pending() -> None:
    bad = bool(torch.stack(_pending).any())
    _pending.clear()
    if bad:
        raise RuntimeError(NOT_UNIFORM)


class _GradInForward(torch.autograd.Function):
    """``(g(x), logdet)`` whose logdet gradient is computed in the forward pass.

    The logdet's own graph is freed before returning; only ``g``'s graph is kept.
    The stored parameter gradient is a sum over the batch, so the upstream gradient
    of the logdet must be the same for every sample (e.g. a batch-mean loss).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        run: Callable[[Tensor], tuple[Tensor, Tensor]],
        x: Tensor,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            gx, logdet = run(xd)
            grads = torch.autograd.grad(
                logdet.sum(), (xd, *params), retain_graph=True, allow_unused=True
            )
        ctx.gx, ctx.xd, ctx.params, ctx.grads = gx, xd, params, grads
        return gx.detach(), logdet.detach()

    @staticmethod
    def backward(ctx, grad_gx: Tensor, grad_logdet: Tensor):  # type: ignore[override]
        gx, xd, params, grads = ctx.gx, ctx.xd, ctx.params, ctx.grads
        del ctx.gx, ctx.xd, ctx.grads
        scale = check_uniform(grad_logdet)
        with torch.enable_grad():
            dg = torch.autograd.grad(gx, (xd, *params), grad_gx, allow_unused=True)
        shape = (-1,) + (1,) * (xd.dim() - 1)
        out = []
        for i, (a, b) in enumerate(zip(dg, grads)):
            if b is not None:
                b = b * (grad_logdet.view(shape) if i == 0 else scale)
            out.append(b if a is None else (a if b is None else a + b))
        return (None, *out)


def grad_in_forward(
    g: nn.Module,
    run: Callable[[Tensor], tuple[Tensor, Tensor]],
    x: Tensor,
    extra: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor]:
    """``run(x) = (g(x), logdet)`` with the memory-saving backward-in-forward trick
    (``g`` gives the parameters that receive gradients; ``extra``, other tensors that
    ``run`` reads and that require grad, e.g. the context of a conditional branch)."""
    params = [p for p in g.parameters() if p.requires_grad]
    return _GradInForward.apply(run, x, *params, *extra)  # type: ignore[no-untyped-call]
