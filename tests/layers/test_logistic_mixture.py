"""Flow++'s logistic-mixture CDF transformer: the formula, its log-derivative against
autograd, monotonicity, log-space stability, and the bisection inverse on [-30, 30]
with extreme mixture parameters."""

from __future__ import annotations

import pytest
import torch

from resflow.layers.logistic_mixture import LogisticMixtureCDF

K = 4
GRID = torch.linspace(-30, 30, 1201, dtype=torch.float64)


def _params(t, shape, scale=1.0, seed=0, dtype=torch.float64):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape[0], t.n_params, *shape[1:], generator=gen, dtype=dtype)


def _mixture(a, b, logits, means, log_scales):  # type: ignore[no-untyped-def]
    """One mixture ``[1, 2 + 3K, len(GRID)]`` shared by the grid's elements."""
    p = torch.tensor([a, b, *logits, *means, *log_scales], dtype=torch.float64)
    return p.view(1, -1, 1).expand(1, -1, len(GRID)).contiguous()


# Extreme but well-posed: between two sharp components far apart ``F`` is flat to
# below the float64 resolution, and no inverse can recover ``x`` there.
EXTREME = {
    # one component of weight 1 - 1e-13 and scale e^-7, three others of weight 1e-13
    "tiny-scale-near-one-weight": (0.3, 1.0, [30, 0, 0, 0], [3, -5, 0, 5], [-7, 0, 0, 0]),
    "below-the-scale-floor": (0.0, 0.0, [0, 0, 0, 0], [-2, -1, 1, 2], [-50, -50, -50, 0]),
    "huge-scales": (1.0, -3.0, [0.5, -1, 2, 0], [-1, 0, 2, 10], [7, 7, 5, 6]),
    "far-means-right": (-1.0, 0.0, [0, 1, -1, 0], [1000, 1001, 999, 1000.5], [0, 0.5, -0.5, 1]),
    "far-means-left": (0.5, 2.0, [0, 1, -1, 0], [-1000, -990, -1010, -995], [0, 2, 1, 3]),
    "near-one-weights": (0.0, 0.0, [-40, 40, -40, -40], [-20, 4, 20, 25], [2, -6, 2, 1]),
    "spread": (2.0, 5.0, [0, 0, 0, 0], [-25, -8, 8, 25], [0, 0, 0, 0]),
}


def test_the_formula():
    t = LogisticMixtureCDF(K).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    p = _params(t, (3, 5), scale=1.5, seed=1)
    y, _ = t(x, p)
    a, b = torch.tanh(p[:, 0]), p[:, 1]
    pi = torch.softmax(p[:, 2 : 2 + K], 1)
    mu, s = p[:, 2 + K : 2 + 2 * K], p[:, 2 + 2 * K :].exp()
    cdf = (pi * torch.sigmoid((x[:, None] - mu) / s)).sum(1)
    torch.testing.assert_close(y, torch.logit(cdf) * a.exp() + b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("tanh_scale", [True, False])
def test_logdet_is_the_autograd_log_derivative(tanh_scale):
    t = LogisticMixtureCDF(K, tanh_scale=tanh_scale).double()
    x = (8 * torch.randn(6, 7, dtype=torch.float64)).requires_grad_(True)
    p = _params(t, (6, 7), scale=2.0, seed=2)
    y, logdet = t(x, p)
    (dy,) = torch.autograd.grad(y.sum(), x)  # elementwise: the Jacobian is diagonal
    torch.testing.assert_close(logdet, dy.log(), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(EXTREME))
def test_monotone_and_finite_with_extreme_parameters(name):
    t = LogisticMixtureCDF(K).double()
    y, logdet = t(GRID[None], _mixture(*EXTREME[name]))
    assert (y.diff() > 0).all() and torch.isfinite(logdet).all()


def test_monotone_for_random_parameters():
    t = LogisticMixtureCDF(K).double()
    for seed in range(5):
        p = _params(t, (1, 1), scale=4.0, seed=seed).expand(1, t.n_params, len(GRID))
        y, logdet = t(GRID[None], p)
        assert (y.diff() > 0).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize("name", sorted(EXTREME))
def test_inverse_within_1e5_on_minus30_to_30_with_extreme_parameters(name):
    t = LogisticMixtureCDF(K).double()
    p = _mixture(*EXTREME[name])
    y, logdet = t(GRID[None], p)
    lo, hi = t.bracket(y, p)  # the bracket holds the root: no expansion needed
    assert (t(lo, p)[0] <= y).all() and (t(hi, p)[0] >= y).all()
    x, logdet_inv = t.inverse(y, p)
    assert (x - GRID).abs().max() < 1e-5
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-8, rtol=1e-8)


def test_float32_inverse_and_no_saturation():
    """Log space: in float32 the map and its inverse hold over [-30, 30] (sigmoid
    itself rounds to 1 beyond 17) and agree with float64. (The float32 inverse error is
    the resolution of ``y`` over the slope; moderate parameters keep it below 1e-5.)"""
    t = LogisticMixtureCDF(K)
    x = GRID.float().repeat(3, 1)
    p = _params(t, tuple(x.shape), scale=0.3, seed=3)
    y32, ld32 = t(x, p.float())
    y64, ld64 = t.double()(x.double(), p)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ld32.double(), ld64, rtol=1e-4, atol=1e-4)
    x_back, _ = t.float().inverse(y32, p.float())
    assert (x_back - x).abs().max() < 1e-5


def test_inverse_gradients_are_the_implicit_ones():
    t = LogisticMixtureCDF(K).double()
    p = _params(t, (2, 5), scale=1.0, seed=4).requires_grad_(True)
    y = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    x, logdet_inv = t.inverse(y, p)
    (dx_dy,) = torch.autograd.grad(x.sum(), y, retain_graph=True)
    torch.testing.assert_close(dx_dy, logdet_inv.exp(), atol=1e-9, rtol=1e-9)
    # d x / d params = -(dT/dparams) / T'  (implicit function theorem)
    x0 = x.detach()
    y_fwd, logdet = t(x0, p)
    (dT,) = torch.autograd.grad(y_fwd.sum(), p)
    (dx_dp,) = torch.autograd.grad(x.sum(), p)
    expected = -dT / logdet.detach().exp().unsqueeze(1)
    torch.testing.assert_close(dx_dp, expected, atol=1e-9, rtol=1e-9)


def test_identity_at_zero_parameters_and_errors():
    t = LogisticMixtureCDF(3)
    assert t.n_params == 11
    x = torch.randn(4, 6)
    y, logdet = t(x, torch.zeros(4, 11, 6))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    assert logdet.abs().max() < 1e-5
    with pytest.raises(ValueError, match="at least one component"):
        LogisticMixtureCDF(0)
    with pytest.raises(ValueError, match="params of shape"):
        t(x, torch.zeros(4, 10, 6))
