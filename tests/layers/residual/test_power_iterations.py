"""A fixed number of power iterations between certificates (the authors'
``--n-lipschitz-iters``): exactly that many steps, the same iterates as the adaptive
refresh forced to that many, no value read on the host, and certificates unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from resflow.certify import certify
from resflow.config import ConfigError
from resflow.layers.base import after_optimizer_step
from resflow.layers.residual.lipschitz_layers import LipschitzLinear
from resflow.layers.residual.refresh import refresh_all
from resflow.layers.residual.spectral import LipschitzLayer, set_power_iterations
from resflow.models import build_model
from resflow.models.residual_flow import VectorFlowConfig


def _perturbed(layers: list[LipschitzLinear]) -> None:
    with torch.no_grad():
        for m in layers:
            m.weight.add_(0.3 * torch.randn_like(m.weight))


@pytest.mark.parametrize("grouped", [True, False])
def test_exactly_k_iterations_the_same_iterates_as_the_adaptive_refresh_forced_to_k(grouped):
    torch.manual_seed(0)
    shapes = [(8, 8)] * 4 if grouped else [(8, 6), (5, 8), (8, 8)]
    layers = [LipschitzLinear(a, b) for a, b in shapes]
    _perturbed(layers)
    forced = copy.deepcopy(layers)
    for m in layers:
        m.fixed_iter = 3
    assert refresh_all(layers) == 3
    for m in forced:
        m.refresh(atol=0.0, rtol=0.0, max_iter=3)  # never settles: stops at 3
    for a, b in zip(layers, forced):
        torch.testing.assert_close(a.v, b.v, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-6, atol=1e-7)


def test_a_fixed_refresh_reads_nothing_on_the_host(monkeypatch):
    torch.manual_seed(0)
    layers = [LipschitzLinear(8, 8) for _ in range(3)] + [LipschitzLinear(4, 8)]
    _perturbed(layers)
    for m in layers:
        m.fixed_iter = 5

    def read(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a value was read on the host")

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read)
    refresh_all(layers)
    monkeypatch.undo()
    for m in layers:  # the adaptive refresh does read (the test can see reads)
        m.fixed_iter = 0
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read)
    with pytest.raises(AssertionError, match="read on the host"):
        refresh_all(layers)


def test_the_config_sets_every_layer_and_certificates_still_hold():
    torch.manual_seed(0)
    model = build_model(VectorFlowConfig(dim=2, n_blocks=3, hidden=(16, 16), power_iterations=2))
    layers = [m for m in model.modules() if isinstance(m, LipschitzLayer)]
    assert layers and all(m.fixed_iter == 2 for m in layers)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(12):  # certificates every 10 steps, fixed refreshes in between
        loss = -model.log_prob(torch.randn(64, 2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_optimizer_step(model)
    model.eval()
    assert certify(model, torch.randn(32, 2)).passed
    with pytest.raises(ConfigError, match="power_iterations: must be >= 0"):
        VectorFlowConfig(power_iterations=-1)
    with pytest.raises(ValueError, match="power_iterations must be >= 0"):
        set_power_iterations(model, -2)
