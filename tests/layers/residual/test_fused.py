"""The exact log-determinant of dense branches as two pure functions (fused.py): equal to
autograd through the brute-force Jacobian's ``slogdet``, to the general closed-form
path, and compiled to eager."""

import pytest
import torch

from resflow.layers import ResidualBlock
from resflow.layers.residual import fused, kernels
from resflow.layers.residual.logdet import LogdetEstimator
from resflow.nets import residual_cnn, residual_mlp


def _block(dim, preact, learned=True, hidden=(8, 8), dtype=torch.float64):
    torch.manual_seed(4)
    g = residual_mlp(dim, hidden, coeff=0.9, preact=preact).to(dtype)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if not learned:
        for m in g:
            if hasattr(m, "b"):
                m.b.requires_grad_(False)
    block = ResidualBlock(g)
    block.train_estimator = LogdetEstimator(method="exact")
    return block


def _brute_force(block, x, loss_fn):
    """Loss and gradients by autograd through ``slogdet(I + J)`` of the full Jacobian."""
    g = block.g
    xg = x.clone().requires_grad_(True)
    gx = g(xg)
    rows = [
        torch.autograd.grad(gx[:, i].sum(), xg, create_graph=True)[0] for i in range(x.shape[1])
    ]
    jac = torch.stack(rows, 1)
    logdet = torch.linalg.slogdet(torch.eye(x.shape[1], dtype=x.dtype) + jac)[1]
    loss = loss_fn(xg + gx, logdet)
    params = [p for p in g.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [xg, *params], allow_unused=True)
    return loss.detach(), grads


def _fused(block, x, loss_fn):
    params = [p for p in block.g.parameters() if p.requires_grad]
    xg = x.clone().requires_grad_(True)
    y, logdet = block(xg)
    loss = loss_fn(y, logdet)
    grads = torch.autograd.grad(loss, [xg, *params], allow_unused=True)
    return loss.detach(), grads


LOSSES = {
    "both": lambda y, ld: (y.pow(2).sum(1) - ld).mean(),
    "logdet only": lambda y, ld: -ld.sum(),
    "output only": lambda y, ld: y.pow(2).mean() + 0.0 * ld.mean(),
    # each sample's upstream gradient scales its own cotangent (no batch mean assumed)
    "per-sample weights": lambda y, ld: (
        (y.pow(2).sum(1) - ld) * torch.linspace(0.2, 3.0, len(ld), dtype=ld.dtype)
    ).sum(),
}


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("preact", [True, False])
@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("hidden", [(8, 8), (16, 12)])
def test_fused_exact_branch_equals_autograd_through_slogdet(dim, preact, learned, hidden):
    """(16, 12): the first and last layers' products take the transposed layouts."""
    block = _block(dim, preact, learned, hidden)
    x = torch.randn(7, dim, dtype=torch.float64)
    assert fused.supported(block.g, x)
    block(x)  # lazy state
    for name, loss_fn in LOSSES.items():
        ref_loss, ref = _brute_force(block, x, loss_fn)
        loss, got = _fused(block, x, loss_fn)
        torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-10, msg=name)
        for a, b in zip(got, ref):
            a = torch.zeros_like(b) if a is None and b is not None else a
            b = torch.zeros_like(a) if b is None and a is not None else b
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-8, msg=name)


def test_fused_path_equals_the_general_closed_form(monkeypatch):
    """The same numbers as jacobian.neumann_branch (which it replaces for these branches),
    through a whole model with shared rescaled weights."""
    from resflow.data import load_data
    from resflow.models import build_model, get_preset
    from resflow.training import Batch, MaximumLikelihood

    torch.manual_seed(0)
    model = build_model(get_preset("toy2d", n_blocks=3, hidden=(16, 16))).double()
    x = load_data("8gaussians", n_train=400, n_test=10).train[:200].double()
    with torch.no_grad():
        model(x)
    outs = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(fused, "supported", lambda g, x: False)
        model.zero_grad()
        loss, _ = MaximumLikelihood(model)(model, Batch(x))
        loss.backward()
        outs.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-12, rtol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (torch.randn(30, 16), torch.randn(16, 2)),  # onto few columns, both contiguous
        (torch.randn(16, 30).t(), torch.randn(16, 3)),  # a transposed
        (torch.randn(2, 30, 16), torch.randn(16, 2)),  # a batch of tangents
        (torch.randn(2, 30, 16), torch.randn(2, 16).t()),  # b transposed already
        (torch.randn(30, 2), torch.randn(2, 16)),  # from few columns
        (torch.randn(30, 16), torch.randn(16, 12)),  # wide
    ],
)
def test_products_onto_few_columns_equal_matmul(a, b):
    got = fused._mm(a, b)
    assert got.shape == (a @ b).shape
    torch.testing.assert_close(got, a @ b, rtol=1e-5, atol=1e-5)


SERIES = {
    "geometric, backprop through the series": LogdetEstimator(
        dist="geometric", neumann_grad=False, grad_in_forward=False
    ),
    "poisson, Neumann gradient": LogdetEstimator(dist="poisson"),
    "truncated at 5, two Hutchinson vectors": LogdetEstimator(
        n_exact_terms=5, dist="none", n_hutchinson=2, neumann_grad=False
    ),
    "geometric, Neumann, three vectors": LogdetEstimator(
        dist="geometric", n_hutchinson=3, grad_in_forward=False
    ),
}


@pytest.mark.parametrize("name", list(SERIES))
@pytest.mark.parametrize("preact", [True, False])
def test_fused_series_equals_autograd_through_the_series(name, preact):
    """The series estimate from the explicit 2x2 Jacobians: the same draws, value and
    gradients (of the series, or the Neumann estimator's) as the autograd path's
    vector-Jacobian products, for every loss, per-sample weights included."""
    block = _block(2, preact, hidden=(16, 12))
    block.train_estimator = SERIES[name]
    x = torch.randn(9, 2, dtype=torch.float64)
    block(x)  # lazy state
    for loss_name, loss_fn in LOSSES.items():
        outs = []
        for path in ("autograd", "fused"):
            block.path = path
            assert block.choose_path(x.requires_grad_(True)) == path
            for seed in (0, 1):  # two draws: different numbers of terms
                torch.manual_seed(seed)
                outs.append((path, _fused(block, x.detach(), loss_fn)))
        ref, got = outs[:2], outs[2:]
        if loss_name != "output only":  # the two draws differ
            assert not torch.equal(ref[0][1][0], ref[1][1][0])
        for (_, (ref_loss, ref_grads)), (_, (loss, grads)) in zip(ref, got):
            msg = f"{name}, {loss_name}"
            torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-10, msg=msg)
            for a, b in zip(grads, ref_grads):
                a = torch.zeros_like(b) if a is None and b is not None else a
                b = torch.zeros_like(a) if b is None and a is not None else b
                if a is not None:
                    torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-8, msg=msg)


def test_the_series_cotangent_is_the_derivative_of_the_estimate():
    """``series_from_jacobian``'s cotangent against autograd through its own value, on
    random (non-symmetric) Jacobians and a long draw."""
    from resflow.layers.residual.logdet import series_from_jacobian

    jac = (0.4 * torch.randn(5, 3, 3, dtype=torch.float64)).requires_grad_(True)
    est = LogdetEstimator(n_exact_terms=2, dist="geometric", n_hutchinson=2, neumann_grad=False)
    weights = [1.0, 1.0, 1.0, 2.0, 4.0, 8.0, 16.0]
    torch.manual_seed(3)
    value, cot = series_from_jacobian(jac, est, 6, weights)
    (grad,) = torch.autograd.grad(value.sum(), jac)
    torch.testing.assert_close(cot, grad, atol=1e-12, rtol=1e-10)
    # the value is the series of v^T J^k v
    torch.manual_seed(3)
    want = torch.zeros(5, dtype=torch.float64)
    for _ in range(2):
        v = torch.randn(5, 3, 1, dtype=torch.float64)
        w = v
        for k in range(1, 7):
            w = jac @ w
            want = want + (-1.0) ** (k + 1) / k * weights[k] * (v * w).sum((1, 2)) / 2
    torch.testing.assert_close(value, want.detach(), atol=1e-12, rtol=1e-10)


def test_only_dense_lipswish_branches_on_small_vectors_are_taken():
    x2 = torch.randn(4, 2)
    assert fused.supported(residual_mlp(2, (8,)), x2)
    assert not fused.supported(residual_mlp(2, (8,), activation="elu"), x2)
    # other induced norms (fixed or learned) keep the general path, which rescales them
    assert not fused.supported(residual_mlp(2, (8,), norm_orders=[2.0, 3.0]), x2)
    assert not fused.supported(residual_mlp(2, (8,), learn_orders=True), x2)
    assert not fused.supported(residual_mlp(2, (8,)), torch.randn(4, 1, 1, 2))
    big = fused.MAX_DIM + 1
    assert not fused.supported(residual_mlp(big, (8,)), torch.randn(4, big))
    assert not fused.supported(residual_cnn(1, 4), torch.randn(2, 1, 3, 3))


def test_compiled_functions_give_the_eager_numbers():
    """With compilation on, both passes run as compiled graphs (or, without a working
    compiler, fall back with a warning): the same loss and gradients to float32
    rounding."""
    block = _block(2, True, hidden=(32, 32), dtype=torch.float32)
    x = torch.randn(64, 2)
    block(x)
    eager = _fused(block, x, LOSSES["both"])
    kernels.set_compile(True)
    try:
        compiled = _fused(block, x, LOSSES["both"])
    finally:
        kernels.set_compile(False)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
