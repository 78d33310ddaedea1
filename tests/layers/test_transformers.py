import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from resflow.layers.transformers import (
    Additive,
    Affine,
    BracketNotFoundError,
    MonotoneTransformer,
    Transformer,
    bisection_inverse,
)

CLOSED_FORM = {
    "affine-exp": lambda: Affine("exp"),
    "affine-exp-clamped": lambda: Affine("exp", clamp=2.5),
    "affine-sigmoid": lambda: Affine("sigmoid"),
    "affine-softplus": lambda: Affine("softplus", eps=1e-2),
    "additive": Additive,
}


class TanhBump(MonotoneTransformer):
    """Test-only: ``y = s x + w tanh(k x) + t`` with ``s = e^a``, ``w = softplus(b)``,
    ``k = e^c``; ``dy/dx = s + w k (1 - tanh^2(k x)) > 0``. No closed-form inverse."""

    n_params = 4

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(x, params)
        s, w, k, t = params[:, 0].exp(), F.softplus(params[:, 1]), params[:, 2].exp(), params[:, 3]
        th = torch.tanh(k * x)
        return s * x + w * th + t, torch.log(s + w * k * (1 - th * th))


def _elementwise_derivative(fn, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
@pytest.mark.parametrize("shape", [(6, 3), (2, 2, 3, 3)])
def test_closed_form_round_trip_and_logdet(name, shape):
    t = CLOSED_FORM[name]().double()
    x = torch.randn(shape, dtype=torch.float64) * 3
    params = torch.randn(shape[0], t.n_params, *shape[1:], dtype=torch.float64) * 2
    y, logdet = t(x, params)
    assert y.shape == x.shape and logdet.shape == x.shape
    x_rec, logdet_inv = t.inverse(y, params)
    torch.testing.assert_close(x_rec, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-12, rtol=1e-12)
    dydx = _elementwise_derivative(lambda v: t(v, params)[0], x)
    torch.testing.assert_close(logdet, dydx.log(), atol=1e-12, rtol=1e-12)
    dxdy = _elementwise_derivative(lambda v: t.inverse(v, params)[0], y)
    torch.testing.assert_close(logdet_inv, dxdy.log(), atol=1e-12, rtol=1e-12)


def test_affine_scales_follow_their_formulas():
    x = torch.tensor([[2.0]], dtype=torch.float64)
    h, t = 0.3, -1.0
    params = torch.tensor([[[h], [t]]], dtype=torch.float64)
    expected = {
        "exp": math.exp(h),
        "sigmoid": 1 / (1 + math.exp(-(h + 2))),
        "softplus": math.log1p(math.exp(h)) + 0.1,
    }
    for scale, s in expected.items():
        y, logdet = Affine(scale, eps=0.1)(x, params)  # type: ignore[arg-type]
        assert y.item() == pytest.approx(2.0 * s + t, rel=1e-12)
        assert logdet.item() == pytest.approx(math.log(s), rel=1e-12)


def test_affine_exp_and_additive_are_identity_at_zero_params():
    x = torch.randn(4, 3)
    for t in (Affine("exp"), Additive()):
        y, logdet = t(x, torch.zeros(4, t.n_params, 3))
        assert torch.equal(y, x) and torch.equal(logdet, torch.zeros_like(x))


def test_bad_params_shape_and_scale():
    with pytest.raises(ValueError, match=r"params of shape .*\(4, 2, 3\)"):
        Affine()(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="unknown scale"):
        Affine("cosh")  # type: ignore[arg-type]


def test_clamped_exp_scale_is_soft_clamped_and_finite_for_any_h():
    """``log s = c tanh(h / c)``: ~``h`` near 0, inside ``(-c, c)`` for every h, so the map,
    its logdet and its inverse stay finite where the plain ``exp`` overflows."""
    t = Affine("exp", clamp=3.0)
    h = torch.tensor([-1e30, -1e4, -0.01, 0.0, 0.01, 1e4, 1e30])
    torch.testing.assert_close(t.log_scale(h), 3.0 * torch.tanh(h / 3.0))
    assert bool((t.log_scale(h).abs() <= 3.0).all())
    assert t.log_scale(torch.tensor(0.01)).item() == pytest.approx(0.01, rel=1e-4)
    x = torch.full((1, 7), 50.0)
    params = torch.stack([h, torch.full_like(h, -7.0)])[None]
    y, logdet = t(x, params)
    x_rec, logdet_inv = t.inverse(y, params)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(x_rec, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    plain_y, plain_logdet = Affine("exp")(x, params)
    assert not torch.isfinite(plain_y).all()  # what the clamp prevents
    assert "clamp=3.0" in repr(t) and "clamp" not in repr(Affine("exp"))


def test_clamp_needs_the_exp_scale_and_a_positive_bound():
    for scale, clamp in (("sigmoid", 3.0), ("tanh", 1.0), ("exp", 0.0), ("exp", -1.0)):
        with pytest.raises(ValueError, match="clamp must be positive"):
            Affine(scale, clamp=clamp)  # type: ignore[arg-type]


# Rows of (a, b, c, t): flat and steep slopes, sharp large steps, large shifts.
EXTREME = [
    [0.0, 0.0, 0.0, 0.0],
    [-3.0, 4.0, 3.0, 5.0],  # flat slope e^-3, a sharp step of height ~4
    [3.0, -5.0, -3.0, -20.0],  # steep slope, negligible bump
    [-3.0, -8.0, 5.0, 25.0],
    [2.0, 3.0, 0.5, -7.0],
]
# float32 cannot resolve x better than ulp(y) / T'(x): keep the slope >= 1 there.
WELL_CONDITIONED = [
    [0.0, 0.0, 0.0, 0.0],
    [0.0, 4.0, 3.0, 5.0],
    [3.0, -5.0, -3.0, -20.0],
    [0.5, -8.0, 5.0, 25.0],
    [2.0, 3.0, 0.5, -7.0],
]


def _grid(rows: list[list[float]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x on [-30, 30] (one row per parameter row), params of shape [rows, 4, grid]."""
    x = torch.linspace(-30, 30, 1201, dtype=dtype)
    p = torch.tensor(rows, dtype=dtype)
    return x.expand(len(rows), -1).contiguous(), p[:, :, None].expand(-1, -1, len(x)).contiguous()


@pytest.mark.parametrize(
    "dtype,rows,tol",
    [(torch.float32, WELL_CONDITIONED, 1e-5), (torch.float64, EXTREME, 1e-10)],
    ids=["float32", "float64"],
)
def test_bisection_inverts_monotone_transformer(dtype, rows, tol):
    t = TanhBump()
    x, params = _grid(rows, dtype)
    y, logdet = t(x, params)
    x_rec, logdet_inv = t.inverse(y, params)
    assert x_rec.dtype == dtype
    err = ((x_rec - x).abs() / x.abs().clamp(min=1)).max().item()
    assert err < tol
    torch.testing.assert_close(logdet_inv, -t(x_rec, params)[1])
    torch.testing.assert_close(logdet_inv, -logdet, atol=tol * 100, rtol=tol * 100)


def test_bisection_brackets_the_crossing_in_float32_with_extreme_parameters():
    """Where float32 cannot recover x itself (flat slopes), the answer is still within
    the dtype's resolution of where the computed T crosses y."""
    t = TanhBump()
    x, params = _grid(EXTREME, torch.float32)
    y, _ = t(x, params)
    x_rec, _ = t.inverse(y, params)
    delta = 2 * torch.finfo(torch.float32).eps * x_rec.abs().clamp(min=1)
    assert (t(x_rec - delta, params)[0] <= y).all()
    assert (t(x_rec + delta, params)[0] >= y).all()


def test_bisection_reaches_dtype_resolution():
    """The stopping rule: the interval is at most eps * max(1, |x|) wide."""
    y = torch.tensor([-7.5e5, -3.3, -1e-3, 0.0, 0.1234567, 2.0, 1e4, 3e12], dtype=torch.float64)
    x = bisection_inverse(lambda v: v, y)
    eps = torch.finfo(torch.float64).eps
    assert ((x - y).abs() <= eps * y.abs().clamp(min=1)).all()


def test_bracket_expansion_far_outside_initial_bracket():
    y = torch.tensor([-1e15, -1e6, 5e5, 1e15], dtype=torch.float64)
    x = bisection_inverse(lambda v: 2 * v + 1, y, lower=-0.5, upper=0.5)
    torch.testing.assert_close(x, (y - 1) / 2, atol=0, rtol=1e-14)
    y = torch.tensor([-1e30, 1e30], dtype=torch.float64)
    x = bisection_inverse(torch.sinh, y)  # x = +-asinh(1e30) ~ +-69.8
    torch.testing.assert_close(x, torch.asinh(y), atol=0, rtol=1e-13)


def test_bisection_errors():
    with pytest.raises(ValueError, match="non-finite"):
        bisection_inverse(torch.sinh, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        TanhBump().inverse(torch.tensor([[float("inf")]]), torch.zeros(1, 4, 1))
    with pytest.raises(BracketNotFoundError, match="no bracket"):
        bisection_inverse(torch.tanh, torch.tensor([0.5, 2.0]))
    with pytest.raises(BracketNotFoundError):
        bisection_inverse(lambda v: v, torch.tensor([1e6]), max_expansions=3)
    assert issubclass(BracketNotFoundError, RuntimeError)
    with pytest.raises(ValueError, match="lower < upper"):
        bisection_inverse(torch.sinh, torch.zeros(2), lower=1.0, upper=0.0)


def test_monotone_inverse_is_differentiable():
    """Implicit-function gradients of the bisection inverse match autograd's gradcheck."""
    t = TanhBump()
    y = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    params = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: t.inverse(a, b), (y, params))


def test_transformer_base_is_abstract():
    with pytest.raises(NotImplementedError):
        Transformer()(torch.zeros(1, 1), torch.zeros(1, 0, 1))
