"""Certified operator-norm bounds against brute force (dense SVD, cube vertices)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from resflow.layers import LipschitzConv2d, LipschitzLinear, refresh_lipschitz
from resflow.layers.residual.mixed_norms import dense_facts, is_exact_pair, mixed_norm_bound
from resflow.layers.residual.spectral_bounds import (
    circular_conv_norm,
    circular_grid,
    conv_spectral_norm,
    spectral_norm,
)

INF = math.inf


def dense_conv(kernel: torch.Tensor, size, padding) -> torch.Tensor:
    """The zero-padded convolution as a dense matrix (output x input), float64."""
    c = kernel.shape[1]
    n = c * size[0] * size[1]
    eye = torch.eye(n, dtype=torch.float64).view(n, c, *size)
    return F.conv2d(eye, kernel.double(), padding=padding).reshape(n, -1).t()


@settings(max_examples=40, deadline=None)
@given(
    o=st.integers(1, 4),
    c=st.integers(1, 4),
    k=st.sampled_from([1, 3, 5]),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_conv_bounds_are_at_least_the_true_norm(o, c, k, h, w, seed, scale):
    kernel = torch.randn(o, c, k, k, generator=torch.Generator().manual_seed(seed)) * scale
    pad = (k // 2, k // 2)
    true = float(torch.linalg.matrix_norm(dense_conv(kernel, (h, w), pad), 2))
    exact = conv_spectral_norm(kernel, (h, w), pad)
    assert exact.exact
    assert true <= float(exact.value) <= true * (1 + 1e-7) + 1e-12
    circ = conv_spectral_norm(kernel, (h, w), pad, exact_limit=0)
    assert float(circ.value) >= true * (1 - 1e-12)
    if k > 1:
        grid = circular_grid((h, w), (k, k), pad)
        assert float(circular_conv_norm(kernel, grid)) >= true * (1 - 1e-12)


@pytest.mark.parametrize("size, padding", [((5, 4), (0, 0)), ((6, 6), (2, 2)), ((4, 7), (1, 1))])
def test_conv_bound_other_paddings(size, padding):
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3)
    true = float(torch.linalg.matrix_norm(dense_conv(kernel, size, padding), 2))
    assert float(conv_spectral_norm(kernel, size, padding).value) == pytest.approx(true, rel=1e-7)
    grid = circular_grid(size, (3, 3), padding)
    assert float(circular_conv_norm(kernel, grid)) >= true


def test_the_circular_bound_is_loose_on_small_images_which_the_exact_path_avoids():
    torch.manual_seed(0)
    kernel = torch.randn(4, 4, 3, 3)
    true = float(torch.linalg.matrix_norm(dense_conv(kernel, (4, 4), (1, 1)), 2))
    circ = float(circular_conv_norm(kernel, circular_grid((4, 4), (3, 3), (1, 1))))
    assert circ > true * 1.01


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_dense_spectral_bound_and_its_cholesky_shortcut(m, n, seed):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    true = float(torch.linalg.matrix_norm(w.double(), 2))
    assert true <= float(spectral_norm(w)) <= true * (1 + 1e-7)
    assert float(spectral_norm(w, guess=true * 1.01)) == pytest.approx(true * 1.01, rel=1e-7)
    assert float(spectral_norm(w, guess=true * 0.99)) >= true  # refused: exact instead


@pytest.mark.parametrize(
    "rtol, kind",
    [(1e-2, "linear"), (1e-4, "linear"), (1e-6, "linear"), (1e-2, "conv"), (1e-4, "conv")],
)
def test_certified_bound_converges_to_the_true_norm_as_iterations_grow(rtol, kind):
    """The certificate ``upper`` always bounds the norm; the power iteration's lower
    bound ``sigma`` closes the gap to it to ``rtol``, so both converge to the norm."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = LipschitzLinear(12, 10, coeff=0.5).double()
        true = float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
    else:
        layer = LipschitzConv2d(3, 4, 3, coeff=0.5).double()
        layer(torch.randn(1, 3, 6, 6, dtype=torch.float64))
        true = float(torch.linalg.matrix_norm(dense_conv(layer.weight.detach(), (6, 6), (1, 1)), 2))
    layer.v.copy_(torch.randn_like(layer.v))
    layer.certify(atol=0.0, rtol=rtol, max_iter=100_000)
    assert float(layer.sigma) <= true * (1 + 1e-12) <= float(layer.upper) * (1 + 1e-12)
    assert float(layer.upper) <= true * (1 + rtol + 1e-7)
    assert float(layer.upper - layer.sigma) <= (rtol + 1e-7) * float(layer.upper)  # + margins


# ---- mixed norms ----------------------------------------------------------------------------
def brute_mixed(w: torch.Tensor, p: float, q: float) -> float:
    """``||W||_{p->q}``: exactly over the cube's vertices for ``p = inf``, else the best
    of many generalized-power-method runs (a lower bound that is tight in practice)."""
    w = w.double()
    n = w.shape[1]
    if p == INF:
        signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=w.dtype)
        return float(torch.linalg.vector_norm(signs @ w.t(), ord=q, dim=1).max())
    x = torch.randn(500, n, dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    ps = p / (p - 1) if p > 1 else INF

    def dual(y: torch.Tensor, r: float) -> torch.Tensor:
        if r == INF:
            return torch.sign(y) * (y.abs() == y.abs().amax(1, keepdim=True))
        if r == 1.0:
            return torch.sign(y)
        return torch.sign(y) * y.abs() ** (r - 1)

    for _ in range(60):
        x = dual(dual(x @ w.t(), q) @ w, ps)
        x = x / torch.linalg.vector_norm(x, ord=p, dim=1, keepdim=True).clamp_min(1e-300)
    return float(torch.linalg.vector_norm(x @ w.t(), ord=q, dim=1).max())


ORDERS = [1.0, 1.5, 2.0, 3.0, INF]


@pytest.mark.parametrize("p,q", list(itertools.product(ORDERS, ORDERS)))
def test_mixed_norm_bound_is_at_least_the_norm_and_exact_on_exact_pairs(p, q):
    torch.manual_seed(1)
    w = torch.randn(7, 6)
    brute = brute_mixed(w, p, q)
    bound = float(mixed_norm_bound(dense_facts(w), p, q))
    assert bound >= brute * (1 - 1e-9)
    if is_exact_pair(p, q):
        assert bound == pytest.approx(brute, rel=1e-6)


@pytest.mark.parametrize("p,q", [(INF, 2.0), (INF, 1.0), (2.0, 1.0), (3.0, 1.5), (1.5, 3.0),
                                 (2.0, 3.0), (INF, INF), (1.0, 1.0)])  # fmt: skip
def test_each_mixed_norm_layer_is_within_its_coefficient(p, q):
    """The issue's 12x10 layer, coeff 0.9: the brute-force norm after the refresh."""
    torch.manual_seed(0)
    layer = LipschitzLinear(10, 12, coeff=0.9, domain=p, codomain=q)
    with torch.no_grad():
        layer.weight.mul_(10)
    refresh_lipschitz(layer)
    assert brute_mixed(layer.constrained_weight().detach(), p, q) <= 0.9 * (1 + 1e-6)


@pytest.mark.parametrize(
    "o, c, k, size, padding",
    [(3, 2, 3, (5, 4), (1, 1)), (2, 3, 3, (6, 6), (0, 0)), (4, 1, 5, (4, 7), (2, 2)),
     (2, 2, 1, (3, 3), (0, 0)), (1, 4, 3, (2, 2), (2, 2))],
)  # fmt: skip
def test_conv_gram_is_the_dense_operators_gram(o, c, k, size, padding):
    """``conv_gram`` against ``A^T A`` of the convolution built as a dense matrix (rows
    reordered from ``(c, h, w)`` to ``(h, w, c)``)."""
    from resflow.layers.residual.spectral_bounds import conv_gram

    torch.manual_seed(3)
    kernel = torch.randn(o, c, k, k)
    a = dense_conv(kernel, size, padding)
    h, w = size
    order = torch.arange(c * h * w).view(c, h, w).permute(1, 2, 0).reshape(-1)
    want = (a.t() @ a)[order][:, order]
    torch.testing.assert_close(conv_gram(kernel, size, padding), want, atol=1e-12, rtol=1e-12)
