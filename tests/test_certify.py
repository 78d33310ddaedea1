"""The certificate reports certified per-layer bounds and per-block products."""

import math

import torch

from resflow.certify import certify, enforced_norm
from resflow.flow import Flow
from resflow.layers import LipschitzLinear, ResidualBlock
from resflow.nets import residual_mlp


def _flow() -> Flow:
    torch.manual_seed(0)
    blocks = [ResidualBlock(residual_mlp(2, (8,), coeff=0.9)) for _ in range(2)]
    return Flow(blocks, shape=(2,))


def test_certificate_bounds_each_layer_and_block_even_when_an_estimate_is_fooled():
    flow = _flow()
    layer = next(m for m in flow.modules() if isinstance(m, LipschitzLinear))
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0], layer.weight[1, 1] = 40.0, 1.0
        layer.v.copy_(torch.tensor([[0.0, 1.0]]))  # the power iteration never sees the 40
    layer.refresh()
    assert enforced_norm(layer)[0] > 1.0  # as used before certification: expansive
    cert = certify(flow, torch.randn(32, 2))
    assert cert.passed
    for block in cert.blocks:
        assert len(block.layers) == 2
        for ln in block.layers:
            assert ln.norm <= ln.coeff * (1 + 1e-6) and ln.method == "exact (SVD)"
        assert math.isclose(block.bound, math.prod(ln.norm for ln in block.layers))
        assert block.bound <= 0.9**2 * (1 + 1e-6)
    text = "\n".join(cert.lines())
    assert "Lip(g) <= " in text and "||W|| <= " in text


def test_mixed_norm_layers_are_certified_too():
    torch.manual_seed(0)
    g = residual_mlp(2, (8,), coeff=0.9, norm_orders=[3.0, 1.5])
    flow = Flow([ResidualBlock(g)], shape=(2,))
    cert = certify(flow, torch.randn(16, 2))
    for ln in cert.blocks[0].layers:
        assert ln.norm <= 0.9 * (1 + 1e-6)
        assert "bound" in ln.method


def test_coupling_models_get_a_whole_model_round_trip_check():
    from resflow.models import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("realnvp-digits", hidden=8, n_blocks=1))
    x = torch.randint(0, 17, (16, 1, 8, 8))
    model(x)  # data-dependent initialisation, batch-norm averages
    cert = certify(model, x)
    assert cert.passed and cert.round_trip is not None and cert.round_trip < 1e-4
    assert any("whole model: worst round trip" in line for line in cert.lines())
    cert.round_trip = float("inf")  # an inverse that broke down
    assert not cert.passed
