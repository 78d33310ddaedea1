"""The rational-quadratic spline transformer: its derivative against autograd, its
closed-form inverse, monotonicity, the identity outside [-B, B] (float32 and float64),
and its parameter checks."""

from __future__ import annotations

import pytest
import torch

from resflow.layers.splines import RationalQuadraticSpline


def _params(spline: RationalQuadraticSpline, shape, scale: float = 2.0, dtype=torch.float64):
    torch.manual_seed(0)
    return scale * torch.randn(shape[0], spline.n_params, *shape[1:], dtype=dtype)


@pytest.mark.parametrize("bins", [1, 2, 5, 8])
def test_the_log_derivative_is_that_of_autograd(bins):
    spline = RationalQuadraticSpline(bins=bins, bound=3.0)
    x = torch.linspace(-4, 4, 161, dtype=torch.float64).reshape(7, 23).requires_grad_()
    params = _params(spline, x.shape)
    y, logdet = spline(x, params)
    (dydx,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the diagonal
    torch.testing.assert_close(logdet, dydx.log(), atol=1e-10, rtol=1e-10)


def test_the_inverse_and_its_logdet():
    spline = RationalQuadraticSpline(bins=6, bound=2.5)
    x = 3 * torch.randn(64, 5, dtype=torch.float64)
    params = _params(spline, x.shape)
    y, logdet = spline(x, params)
    back, logdet_inv = spline.inverse(y, params)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-9, rtol=0)


def test_the_spline_is_strictly_increasing_and_continuous_at_the_knots():
    spline = RationalQuadraticSpline(bins=8, bound=3.0)
    x = torch.linspace(-5, 5, 20001, dtype=torch.float64).reshape(1, -1)
    params = _params(spline, (1, 1), scale=3.0).expand(1, spline.n_params, x.shape[1])
    y, logdet = spline(x, params)
    steps = y.diff(dim=1)
    assert (steps > 0).all()
    dx = x[0, 1] - x[0, 0]  # no jump anywhere: every step within the slopes around it
    assert (steps <= 1.5 * dx * logdet.exp().max()).all()
    assert torch.isfinite(logdet).all()
    xs, ys, ds = spline.knots(params[..., :1])  # the knots map onto each other
    yk, _ = spline(xs.reshape(1, -1), params[:, :, :1].expand(1, -1, xs.numel()))
    torch.testing.assert_close(yk.flatten(), ys.flatten(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outside_the_interval_the_map_is_exactly_the_identity(dtype):
    """The field's most reported failure: inputs beyond [-B, B] must pass unchanged
    with logdet exactly 0, forwards and backwards, and keep a unit gradient."""
    spline = RationalQuadraticSpline(bins=8, bound=3.0)
    x = torch.tensor([[-1e6, -100.0, -3.0000002, 3.0000002, 42.0, 1e6]], dtype=dtype)
    x = x.requires_grad_()
    params = _params(spline, x.shape, scale=5.0, dtype=dtype)
    y, logdet = spline(x, params)
    assert torch.equal(y.detach(), x.detach()) and torch.equal(logdet, torch.zeros_like(x))
    back, logdet_inv = spline.inverse(y.detach(), params)
    assert torch.equal(back, x.detach()) and torch.equal(logdet_inv, torch.zeros_like(x))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.ones_like(grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_at_and_near_the_ends_the_inverse_holds(dtype):
    spline = RationalQuadraticSpline(bins=4, bound=3.0)
    eps = torch.finfo(dtype).eps
    x = torch.tensor([[-3.0, -3.0 + 10 * eps, 0.0, 3.0 - 10 * eps, 3.0]], dtype=dtype)
    params = _params(spline, x.shape, scale=4.0, dtype=dtype)
    y, logdet = spline(x, params)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert y[0, 0] == -3.0 and y[0, -1] == 3.0  # the ends are fixed points
    back, _ = spline.inverse(y, params)
    torch.testing.assert_close(back, x, atol=100 * eps, rtol=0)


def test_zero_parameters_give_the_identity():
    spline = RationalQuadraticSpline(bins=8, bound=3.0)
    x = torch.linspace(-3, 3, 101, dtype=torch.float64).reshape(1, -1)
    y, logdet = spline(x, torch.zeros(1, spline.n_params, 101, dtype=torch.float64))
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros_like(x), atol=1e-12, rtol=0)


def test_images_shaped_parameters():
    spline = RationalQuadraticSpline(bins=3, bound=2.0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    params = _params(spline, x.shape)
    y, logdet = spline(x, params)
    assert y.shape == x.shape == logdet.shape
    torch.testing.assert_close(spline.inverse(y, params)[0], x, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bins": 0}, "bins must be >= 1"),
        ({"bound": 0.0}, "bound must be a finite number > 0"),
        ({"bound": float("inf")}, "bound must be a finite number > 0"),
        ({"bins": 10, "min_bin": 0.2}, "min_bin \\* bins must be in"),
        ({"min_derivative": 0.0}, "min_derivative must be > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RationalQuadraticSpline(**kwargs)


def test_the_clamp_bounds_the_flattest_slope():
    """Extreme conditioner outputs (an input far from the data) make bins so flat that
    float32 loses the inverse; the soft clamp keeps every slope above a floor."""
    x = torch.linspace(-3, 3, 2001, dtype=torch.float64).reshape(1, -1)
    params = torch.zeros(1, 3 * 8 - 1, x.shape[1], dtype=torch.float64)
    params[:, :8] = torch.linspace(-60, 60, 8)[None, :, None]  # widths 1e-26 apart
    params[:, 8:16] = torch.linspace(60, -60, 8)[None, :, None]
    params[:, 16:] = -60.0
    free = RationalQuadraticSpline(bins=8, bound=3.0)
    clamped = RationalQuadraticSpline(bins=8, bound=3.0, clamp=3.0)
    slope_free = free(x, params)[1].exp().min()
    slope_clamped = clamped(x, params)[1].exp().min()
    assert slope_free < 1e-5 and slope_clamped > 5e-5 and slope_clamped > 50 * slope_free
    with pytest.raises(ValueError, match="clamp must be > 0"):
        RationalQuadraticSpline(clamp=0.0)
