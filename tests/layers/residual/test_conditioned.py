"""A residual block whose branch takes a context, ``g(x; c)`` (the context shifts the first
layer, :class:`~resflow.nets.residual.ConditionedBranch`): its Lipschitz bound in ``x`` is
the unconditional branch's, the paths that take it agree with plain autograd in float64
(context gradients included), the paths that cannot take it are refused or avoided, and
the implicit gradient of its inverse equals autograd through an explicit fixed point."""

import pytest
import torch

from resflow.layers import ResidualBlock, refresh_lipschitz
from resflow.layers.residual.block import ContextBranch
from resflow.layers.residual.logdet import LogdetEstimator
from resflow.nets.residual import ConditionedBranch, residual_mlp

EXACT = LogdetEstimator(method="exact")
SERIES = LogdetEstimator(method="series", n_exact_terms=3, n_hutchinson=2)
CLOSE = dict(rtol=1e-9, atol=1e-11)
K = 2  # context features


def _block(estimator: LogdetEstimator = EXACT, coeff: float = 0.9) -> ResidualBlock:
    torch.manual_seed(0)
    g = residual_mlp(3, (8, 8), coeff=coeff, context_features=K).double()
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    refresh_lipschitz(g, atol=1e-12, rtol=1e-12, max_iter=10_000)
    return ResidualBlock(g, train_estimator=estimator)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    return x, torch.randn(5, K, generator=gen, dtype=torch.float64)


def test_the_branch_is_a_context_branch_that_starts_as_the_unconditional_one():
    torch.manual_seed(0)
    plain = residual_mlp(3, (8, 8))
    torch.manual_seed(0)
    cond = residual_mlp(3, (8, 8), context_features=K)
    assert isinstance(cond, ConditionedBranch) and isinstance(cond, ContextBranch)
    assert not isinstance(plain, ContextBranch)
    x, c = _inputs()
    x, c = x.float(), c.float()
    torch.testing.assert_close(cond(x, c), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="context_features must be >= 1"):
        ConditionedBranch(plain, 0)


def test_the_lipschitz_bound_in_x_holds_for_every_context():
    """Bound = product of the branch's layer norms (V unconstrained); checked on random
    pairs ``x1, x2`` sharing a context, with a large ``V``."""
    block = _block()
    g = block.g
    with torch.no_grad():
        g.shift.copy_(5 * torch.randn_like(g.shift))
    bound = 1.0
    for m in g.branch:
        if hasattr(m, "constrained_weight"):
            bound *= float(torch.linalg.matrix_norm(m.constrained_weight().detach(), ord=2))
    assert bound < 1.0
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.1 * torch.randn(400, 3, generator=gen, dtype=torch.float64)
    c = 3 * torch.randn(400, K, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ratio = (g(x1, c) - g(x2, c)).norm(dim=1) / (x1 - x2).norm(dim=1)
    assert float(ratio.max()) <= bound + 1e-12
    # while the context moves g's value, by more than any Lipschitz bound in x would allow
    with torch.no_grad():
        moved = (g(x1, c) - g(x1, c + 1.0)).norm(dim=1)
    assert float(moved.max()) > 1.0


def _train(block: ResidualBlock, x, c, path: str) -> list[torch.Tensor]:
    block.path = path
    block.zero_grad()
    xg, cg = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    torch.manual_seed(7)
    y, logdet = block(xg, cg)
    (y.pow(2).sum() - logdet.sum()).backward()
    grads = [xg.grad, cg.grad] + [p.grad for p in block.g.parameters() if p.requires_grad]
    return [y.detach(), logdet.detach(), *grads]


@pytest.mark.parametrize("estimator", [EXACT, SERIES], ids=["exact", "series"])
def test_in_forward_equals_autograd_with_a_context(estimator):
    block = _block(estimator)
    with torch.no_grad():
        block.g.shift.normal_()
    x, c = _inputs()
    got, want = _train(block, x, c, "in_forward"), _train(block, x, c, "autograd")
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, **CLOSE)
    assert want[-1].abs().max() > 0  # the context's map V (the last parameter) learns
    assert want[3].abs().max() > 0  # and the context gets its gradient


def test_auto_takes_a_general_path_and_forcing_a_fast_one_is_refused():
    block = _block(LogdetEstimator(method="exact", grad_in_forward=True))
    x, c = _inputs()
    block.train()
    assert block.choose_path(x, c) == "in_forward"
    with torch.no_grad():
        assert block.choose_path(x, c) == "autograd"
        y, logdet = block(x, c)  # eval's "graph_free" would not see the context
    for path in ("fused", "closed_form", "graph_free"):
        block.path = path
        with pytest.raises(ValueError, match=f"path='{path}' .* the branch takes a context"):
            block.choose_path(x, c)
    block.path = "auto"
    with pytest.raises(ValueError, match=r"branch is conditional: pass a context \[batch, 2\]"):
        block(x)
    with pytest.raises(ValueError, match="branch is conditional"):
        block.inverse(y)
    torch.testing.assert_close(block.inverse(y, c), x, atol=1e-9, rtol=1e-9)


def test_an_unconditional_branch_ignores_a_context():
    torch.manual_seed(0)
    block = ResidualBlock(residual_mlp(3, (8,)).double()).eval()
    x, c = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(block(x, c), block(x), rtol=0, atol=0)


def test_the_implicit_gradient_of_the_inverse_with_a_context_is_autograd_through_the_fixed_point():
    """``x = f^{-1}(y; c)``: gradients of a loss of ``x`` for ``y``, ``c`` and every
    parameter (``V`` included) equal those of autograd through 200 explicit fixed-point
    iterations (``Lip(g) <= 0.7**3``: converged far below float64 rounding)."""
    block = _block(coeff=0.7)
    with torch.no_grad():
        block.g.shift.normal_()
    x0, c0 = _inputs()
    with torch.no_grad():
        y0, _ = block(x0, c0)
    weights = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grads(invert) -> list[torch.Tensor]:
        block.zero_grad()
        y, c = y0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        x = invert(y, c)
        (x * weights).sum().backward()
        return [x.detach(), y.grad, c.grad, *(p.grad for p in block.g.parameters())]

    def explicit(y, c):
        x = y
        for _ in range(200):
            x = y - block.g(x, c)
        return x

    got, want = grads(block.inverse), grads(explicit)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert got[2].abs().max() > 0 and got[-1].abs().max() > 0  # c and V get gradients
