import math

import pytest
import torch

from resflow.layers import LipschitzConv2d, LipschitzLinear, NormOrder, refresh_lipschitz

TIGHT = dict(atol=1e-7, rtol=1e-7, max_iter=20_000)


def _dense_conv(layer: LipschitzConv2d, shape) -> torch.Tensor:
    """The convolution operator (no bias) as a dense matrix on inputs of ``shape``."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=layer.weight.dtype).view(n, *shape)
    w = layer.constrained_weight().detach()
    out = torch.nn.functional.conv2d(eye, w, padding=layer.padding)
    return out.reshape(n, -1).t()


def _induced(mat: torch.Tensor, p: float, q: float) -> float:
    """Exactly computable induced norms ||A||_{p->q}."""
    if p == q == 2:
        return float(torch.linalg.matrix_norm(mat, 2))
    if p == q == math.inf:
        return float(mat.abs().sum(1).max())
    if p == q == 1:
        return float(mat.abs().sum(0).max())
    if p == 1:  # max column q-norm
        return float(torch.linalg.vector_norm(mat, q, dim=0).max())
    if q == math.inf:  # max row p*-norm
        ps = 1.0 if p == math.inf else p / (p - 1)
        return float(torch.linalg.vector_norm(mat, ps, dim=1).max())
    raise ValueError


@pytest.mark.parametrize("coeff", [0.5, 0.98])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_linear_spectral_norm_at_most_coeff(coeff, shape):
    layer = LipschitzLinear(shape[1], shape[0], coeff=coeff)
    with torch.no_grad():
        layer.weight.mul_(20)
    refresh_lipschitz(layer, **TIGHT)
    sigma = torch.linalg.matrix_norm(layer.constrained_weight().detach(), 2)
    assert sigma <= coeff * (1 + 1e-5)
    assert sigma >= coeff * (1 - 1e-3)  # a large weight is scaled down to the bound


def test_small_weight_is_left_alone():
    layer = LipschitzLinear(4, 4, coeff=0.98)
    with torch.no_grad():
        layer.weight.mul_(1e-3)
    refresh_lipschitz(layer)
    torch.testing.assert_close(layer.constrained_weight(), layer.weight)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_operator_norm_at_most_coeff(kernel):
    layer = LipschitzConv2d(3, 4, kernel, coeff=0.9).double()
    with torch.no_grad():
        layer.weight.mul_(10)
    layer(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    refresh_lipschitz(layer, **TIGHT)
    sigma = torch.linalg.matrix_norm(_dense_conv(layer, (3, 5, 5)), 2)
    assert 0.9 * (1 - 1e-3) <= sigma <= 0.9 * (1 + 1e-5)


def test_conv_norm_is_the_operator_norm_not_the_kernel_matrix_norm():
    torch.manual_seed(1)
    layer = LipschitzConv2d(2, 2, 3, coeff=100.0).double()
    layer(torch.randn(1, 2, 6, 6, dtype=torch.float64))
    refresh_lipschitz(layer, **TIGHT)
    dense = torch.linalg.matrix_norm(_dense_conv(layer, (2, 6, 6)), 2)
    reshaped = torch.linalg.matrix_norm(layer.weight.detach().reshape(2, -1), 2)
    torch.testing.assert_close(layer.sigma, dense, rtol=1e-4, atol=0)
    assert abs(float(dense - reshaped)) > 1e-3


@pytest.mark.parametrize(
    "p,q", [(math.inf, math.inf), (1.0, 1.0), (1.0, 2.0), (2.0, math.inf), (3.0, math.inf)]
)
def test_induced_norms_at_most_coeff(p, q):
    torch.manual_seed(0)
    layer = LipschitzLinear(6, 5, coeff=0.8, domain=p, codomain=q)
    with torch.no_grad():
        layer.weight.mul_(10)
    refresh_lipschitz(layer, **TIGHT)
    norm = _induced(layer.constrained_weight().detach(), p, q)
    assert norm <= 0.8 * (1 + 1e-5)


def test_learned_norm_orders_receive_gradients():
    dom, cod = NormOrder(2.5), NormOrder(1.5)
    layer = LipschitzLinear(4, 4, coeff=0.5, domain=dom, codomain=cod)
    with torch.no_grad():
        layer.weight.mul_(10)
    refresh_lipschitz(layer)
    layer(torch.randn(3, 4)).pow(2).sum().backward()
    assert dom.raw.grad is not None and cod.raw.grad is not None
    assert float(dom.value().detach()) == pytest.approx(2.5)


def test_refresh_converges_and_persists_vectors():
    layer = LipschitzLinear(8, 8)
    before = layer.v.clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 8))
    its = refresh_lipschitz(layer, atol=1e-6, rtol=1e-6, max_iter=5000)
    assert 1 <= its < 5000
    assert not torch.equal(before, layer.v)
    state = layer.state_dict()
    assert "v" in state and "sigma" in state


def test_conv_state_dict_round_trip_into_fresh_layer():
    a = LipschitzConv2d(2, 3, 3)
    a(torch.randn(1, 2, 4, 4))
    b = LipschitzConv2d(2, 3, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(a(x), b(x))


def test_conv_rejects_a_different_input_size():
    layer = LipschitzConv2d(2, 2, 3)
    layer(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="differs from the size"):
        layer(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match="expected input of shape"):
        layer(torch.randn(1, 3, 4, 4))


def test_bad_options():
    with pytest.raises(ValueError, match="norm order"):
        LipschitzLinear(2, 2, domain=0.5)
    with pytest.raises(ValueError, match="odd"):
        LipschitzConv2d(2, 2, 2)
