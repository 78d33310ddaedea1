"""Convolutions of equal shape and image size share their norm work, as equal dense
layers do (refresh.py): one grouped convolution per power-iteration step, and their
certificates settled together with one batched Cholesky test -- the same vectors,
estimates, bounds and ratios as one layer at a time."""

from __future__ import annotations

import copy

import pytest
import torch

from resflow.layers.residual.lipschitz_layers import LipschitzConv2d
from resflow.layers.residual.refresh import certify_all, refresh_all, refresh_groups
from resflow.layers.residual.spectral_bounds import conv_spectral_norm


def _convs(dtype=torch.float64):
    """Convolutions in two groups of equal shape and image size, and one alone."""
    torch.manual_seed(1)
    specs = [(3, 5, 3, 6)] * 3 + [(5, 5, 1, 6)] * 2 + [(3, 5, 3, 4)]  # in, out, k, size
    layers = []
    for cin, cout, k, size in specs:
        m = LipschitzConv2d(cin, cout, k).to(dtype)
        m(torch.zeros(1, cin, size, size, dtype=dtype))  # the vector, the first certificate
        layers.append(m)
    with torch.no_grad():
        for m in layers:
            m.weight.add_(0.3 * torch.randn_like(m.weight))
    return layers


@pytest.mark.parametrize("fixed", [0, 3])
def test_convolutions_refresh_batched_as_one_at_a_time(fixed):
    """Each stopping on its own rule: the vectors, estimates and iteration count of
    refresh() per layer, adaptive (tolerances that differ per layer) and fixed."""
    layers = _convs()
    assert sorted(len(g) for g in refresh_groups(layers)) == [2, 3]
    for i, m in enumerate(layers):
        m.rtol = 10.0 ** -(3 + i % 3)
        m.fixed_iter = fixed
    twin = copy.deepcopy(layers)
    most = max(m.refresh() for m in twin)
    assert most > 1
    assert refresh_all(layers) == most
    for a, b in zip(layers, twin):
        torch.testing.assert_close(a.v, b.v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("max_iter", [None, 1])
def test_convolutions_certify_batched_as_one_at_a_time(max_iter):
    """Settled together, one batched Cholesky test of their operators' Gram matrices;
    with one iteration allowed the bounds go unconfirmed and each layer goes on from the
    settled state, as certify() does. Every rescaled operator's exact norm is within
    its coefficient."""
    layers = _convs()
    for i, m in enumerate(layers):
        m.rtol = 10.0 ** -(3 + i % 3)
    with torch.no_grad():
        layers[1].v.copy_(torch.randn_like(layers[1].v))  # far from the top vector
    twin = copy.deepcopy(layers)
    most = max(m.certify(max_iter=max_iter) for m in twin)
    assert certify_all(layers, max_iter=max_iter) == most
    for a, b in zip(layers, twin):
        for name in ("v", "sigma", "upper", "ratio"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            w = a.constrained_weight()
        norm = conv_spectral_norm(w, a._size(), a._pad()).value
        assert float(norm) <= a.coeff * (1 + 1e-12)


def test_float64_dense_groups_settle_as_one_at_a_time():
    """In float64 the batched settling kept its previous estimates in the very tensor
    it updated (``.double()`` of a float64 tensor is itself), so it stopped after one
    iteration and left every bound to the slow per-layer path."""
    from resflow.layers.residual.lipschitz_layers import LipschitzLinear

    torch.manual_seed(2)
    layers = [LipschitzLinear(12, 12).double() for _ in range(3)]
    with torch.no_grad():
        for m in layers:
            m.weight.add_(0.5 * torch.randn_like(m.weight))
            m.v.copy_(torch.randn_like(m.v))
    twin = copy.deepcopy(layers)
    most = max(m.certify() for m in twin)
    assert most > 1 and certify_all(layers) == most
    for a, b in zip(layers, twin):
        for name in ("v", "sigma", "upper", "ratio"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)
