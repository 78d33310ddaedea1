"""Precision-aware fixed-point inverses: no false failures in float32, true failures
named by what was measured."""

import pytest
import torch

from resflow import build_model, get_preset
from resflow.layers import LipschitzLinear, LipSwish, ResidualBlock, refresh_lipschitz
from resflow.layers.residual.block import InverseNotConvergedError
from resflow.nets import residual_mlp


def _near_one_model(dtype=torch.float32):
    """The toy2d preset (20 blocks, coeff 0.98) with every weight pushed to its limit
    (orthogonal directions at norm 0.98, nearly ReLU-like LipSwish slopes) and large
    output biases, so that ``y - g(x)`` cancels: float32 rounding then leaves the steps
    at a few 1e-6, above a fixed tolerance (the old stopping rule failed here)."""
    torch.manual_seed(0)
    model = build_model(get_preset("toy2d"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LipschitzLinear):
                u, _, vh = torch.linalg.svd(torch.randn_like(m.weight), full_matrices=False)
                m.weight.copy_(5 * u @ vh)
                if m.out_features == 2:
                    m.bias.copy_(torch.tensor([30.0, -30.0]))
            if isinstance(m, LipSwish):
                m.b.fill_(4.0)
    refresh_lipschitz(model, atol=1e-9, rtol=1e-9, max_iter=5000)
    model(torch.randn(500, 2) * 2)  # ActNorm initialisation
    return model.eval().to(dtype)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_sampling_never_fails_falsely_and_round_trips_within_the_dtype_bound(dtype, bound):
    model = _near_one_model(dtype)
    for seed in range(20):
        torch.manual_seed(seed)
        z = model.base.sample(500) * 1.5
        model.inverse(z)  # raises on a (false) failure
        err = model.round_trip_error(z)
        assert float((err / (1 + z.abs().amax(1))).max()) <= bound, (seed, float(err.max()))


def test_convergence_report():
    torch.manual_seed(0)
    block = ResidualBlock(residual_mlp(3, (16,), coeff=0.9))
    y = torch.randn(8, 3)
    x, info = block.fixed_point(y, return_info=True)
    assert info.iterations >= 2 and info.error_bound.shape == (8,)
    assert 0 <= info.contraction < 1
    assert float(info.error_bound.max()) <= 1e-5
    torch.testing.assert_close(block(x)[0], y, atol=1e-5, rtol=1e-5)


def _expansive_block():
    torch.manual_seed(0)
    g = residual_mlp(2, (2,), coeff=0.98, preact=False)
    for m in g.modules():
        if isinstance(m, LipschitzLinear):
            with torch.no_grad():
                m.weight.copy_(torch.diag(torch.tensor([30.0, 1.0])))
                m.v.copy_(torch.tensor([[0.0, 1.0]]))  # the estimate never sees the 30
            m.refresh()
    return ResidualBlock(g)


def test_a_non_contractive_block_raises_with_the_measured_contraction():
    block = _expansive_block()
    with pytest.raises(
        InverseNotConvergedError, match=r"contraction estimate [0-9.e+]+.*Lip\(g\) >= 1"
    ):
        block.fixed_point(torch.tensor([[3.0, 0.5]]))


def test_non_finite_input_has_its_own_message():
    block = ResidualBlock(residual_mlp(2, (4,)))
    with pytest.raises(ValueError, match="non-finite input"):
        block.inverse(torch.tensor([[float("nan"), 0.0]]))
