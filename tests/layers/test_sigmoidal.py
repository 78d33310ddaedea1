"""DSF / DDSF: monotone, logdet against the autograd derivative, log-space stability,
the bisection inverse, and their parameter layout."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from resflow.layers.sigmoidal import DDSF, DSF

KINDS = {
    "dsf": lambda: DSF(6),
    "ddsf-1": lambda: DDSF(6, 1),
    "ddsf-2": lambda: DDSF(5, 2),
    "ddsf-3": lambda: DDSF(4, 3),
}


def _params(t, shape, scale=1.0, seed=0, dtype=torch.float64):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape[0], t.n_params, *shape[1:], generator=gen, dtype=dtype)


def _perturbed(kind: str):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    t = KINDS[kind]().double()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 1)  # mixing matrices far from uniform
    return t


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logdet_is_the_log_derivative(kind):
    t = _perturbed(kind)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    params = _params(t, (7, 3), scale=2.0)
    y, logdet = t(x, params)
    (dy,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the Jacobian is diagonal
    torch.testing.assert_close(logdet, dy.log(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_increasing_in_its_input_for_any_parameters(kind):
    t = _perturbed(kind)
    x = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    for seed in range(5):
        one = _params(t, (1, 1), scale=3.0, seed=seed)
        y, logdet = t(x[None], one.expand(1, t.n_params, len(x)))
        assert (y.diff() > 0).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bisection_inverse_within_1e5_on_minus30_to_30(kind):
    t = _perturbed(kind)
    x = torch.linspace(-30, 30, 601, dtype=torch.float64).repeat(4, 1)
    params = _params(t, tuple(x.shape), scale=3.0, seed=4)  # extreme, per element
    y, logdet = t(x, params)
    x_rec, logdet_inv = t.inverse(y, params)
    assert (x_rec - x).abs().max() < 1e-5
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_float32_inverse_and_no_saturation(kind):
    """Log-space evaluation: in float32 far beyond sigmoid's saturation (|x| ~ 17) the
    map stays invertible and agrees with float64."""
    t64 = _perturbed(kind)
    t32 = copy.deepcopy(t64).float()
    x = torch.linspace(-10, 10, 201).repeat(2, 1)
    params = _params(t64, tuple(x.shape), seed=5)
    y32, ld32 = t32(x, params.float())
    x_rec, _ = t32.inverse(y32, params.float())
    assert (x_rec - x).abs().max() < 1e-4  # float32 resolution of y over the slope
    far = torch.tensor([[-60.0, 60.0]])
    p_far = _params(t64, (1, 2), seed=6)
    y_far32, ld_far32 = t32(far, p_far.float())
    y_far64, ld_far64 = t64(far.double(), p_far)
    torch.testing.assert_close(y_far32.double(), y_far64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ld_far32.double(), ld_far64, rtol=1e-4, atol=1e-4)


def test_dsf_is_the_formula():
    """``y = logit(sum_k w_k sigmoid(a_k x + b_k))`` with the documented parameter map."""
    t = DSF(3).double()
    with torch.no_grad():
        t.w_logits[0].copy_(torch.tensor([[0.3, -0.2, 0.5]]))
    x = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    params = _params(t, (1, 2), seed=2)
    y, _ = t(x, params)
    p = params[0].T  # [2, 9]: a, b, w shifts per element
    a = torch.nn.functional.softplus(p[:, :3] + math.log(math.e - 1.0)) + 1e-3
    b = p[:, 3:6] + torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    w = torch.softmax(t.w_logits[0][0] + p[:, 6:9], dim=-1)
    d = (w * torch.sigmoid(a * x[0, :, None] + b)).sum(-1)
    torch.testing.assert_close(y[0], torch.logit(d), atol=1e-12, rtol=1e-12)


def test_parameter_counts_and_errors():
    assert DSF(16).n_params == 48
    assert DDSF(16, 2).n_params == 48 + 64  # layer 2 also shifts U per input (16)
    assert DDSF(8, 3).n_params == 24 + 32 + 32
    with pytest.raises(ValueError, match="hidden >= 1 and layers >= 1"):
        DDSF(0, 2)
    with pytest.raises(ValueError, match="min_slope"):
        DSF(4, min_slope=-1.0)
    t = DSF(4)
    with pytest.raises(ValueError, match=r"params of shape"):
        t(torch.randn(2, 3), torch.randn(2, 5, 3))


def test_gradients_reach_the_mixing_matrices():
    t = DDSF(4, 2)
    x = torch.randn(5, 3)
    params = torch.randn(5, t.n_params, 3, requires_grad=True)
    y, logdet = t(x, params)
    (y.pow(2).sum() - logdet.sum()).backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    for name, p in t.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
