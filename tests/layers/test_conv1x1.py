"""Glow's invertible 1x1 convolution: logdet against slogdet of the dense operator,
the LU parameterization, the random rotation at initialisation and the inverse."""

from __future__ import annotations

import pytest
import torch

from resflow.layers.conv1x1 import InvertibleConv1x1


def _dense_operator(layer: InvertibleConv1x1, shape: tuple[int, ...]) -> torch.Tensor:
    d = torch.Size(shape).numel()
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return layer(basis)[0].reshape(d, d).T


@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("shape", [(3, 2, 3), (4,)])
def test_logdet_is_slogdet_of_the_dense_operator(lu, shape):
    torch.manual_seed(0)
    layer = InvertibleConv1x1(shape[0], lu=lu).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    dense = _dense_operator(layer, shape)
    _, logdet = layer(torch.randn(2, *shape, dtype=torch.float64))
    expected = torch.linalg.slogdet(dense)[1]
    torch.testing.assert_close(logdet, expected.expand(2), atol=1e-10, rtol=1e-10)
    hw = torch.Size(shape[1:]).numel()
    torch.testing.assert_close(
        logdet[0], hw * torch.linalg.slogdet(layer.matrix())[1], atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize("lu", [True, False])
def test_starts_as_a_random_rotation(lu):
    torch.manual_seed(1)
    w = InvertibleConv1x1(5, lu=lu).matrix().detach().double()
    torch.testing.assert_close(w.T @ w, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.manual_seed(2)
    other = InvertibleConv1x1(5, lu=lu).matrix().detach().double()
    assert not torch.allclose(w, other)  # drawn from the seed, not a fixed matrix


def test_lu_form_matches_its_factors():
    torch.manual_seed(3)
    layer = InvertibleConv1x1(4).double()
    with torch.no_grad():
        layer.lower.add_(torch.randn(4, 4))  # the masked entries must not matter
        layer.upper.add_(torch.randn(4, 4))
    w = layer.matrix()
    p, lower, upper = torch.linalg.lu(w.detach())
    torch.testing.assert_close(
        torch.log(torch.diagonal(upper).abs()).sum(), layer.log_abs_det().detach()
    )
    torch.testing.assert_close(layer.inverse_matrix() @ w, torch.eye(4, dtype=torch.float64))


def test_inverse_round_trip_and_singular_matrix_error():
    torch.manual_seed(4)
    layer = InvertibleConv1x1(3, lu=False)
    x = torch.randn(2, 3, 4, 4)
    y, _ = layer(x)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.weight.zero_()
    with pytest.raises(FloatingPointError, match="singular"):
        layer.inverse(y)
    with pytest.raises(ValueError, match=r"expects \[B, 3\]"):
        layer(torch.randn(2, 4, 4, 4))
