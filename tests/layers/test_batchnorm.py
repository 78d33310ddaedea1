"""Batch normalization as a flow layer: the running averages of RealNVP's Appendix E
and its logdet in training and evaluation mode against brute-force Jacobians."""

from __future__ import annotations

import io

import pytest
import torch

from resflow.layers.batchnorm import BatchNormFlow
from resflow.models import build_model
from resflow.models.realnvp import RealNVPVectorConfig

from helpers import brute_logdet


def _perturbed(c: int) -> BatchNormFlow:
    layer = BatchNormFlow(c, momentum=0.8).double()
    with torch.no_grad():
        layer.log_gamma.copy_(torch.randn(c))
        layer.beta.copy_(torch.randn(c))
    return layer


@pytest.mark.parametrize("shape", [(3,), (2, 3, 3)])
def test_train_mode_logdet_is_the_jacobian_of_the_map_with_the_statistics_used(shape):
    torch.manual_seed(0)
    layer = _perturbed(shape[0])
    layer(torch.randn(16, *shape, dtype=torch.float64) * 3 + 1)  # initialise the averages
    x = torch.randn(8, *shape, dtype=torch.float64) * 2 - 1
    y, logdet = layer(x)  # training mode: rho * average + (1 - rho) * batch statistics
    # the statistics used are now the stored averages: the per-example map in eval mode
    layer.eval()
    y_eval, logdet_eval = layer(x)
    torch.testing.assert_close(y_eval, y)
    brute = brute_logdet(lambda t: layer(t), x)
    torch.testing.assert_close(logdet, brute, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(logdet_eval, brute, atol=1e-9, rtol=1e-9)


def test_running_averages_follow_appendix_e():
    torch.manual_seed(1)
    layer = BatchNormFlow(2, momentum=0.9, affine=False).double()
    a = torch.randn(32, 2, dtype=torch.float64) + 3
    b = torch.randn(32, 2, dtype=torch.float64) * 4
    layer(a)  # the first batch initialises the averages
    torch.testing.assert_close(layer.running_mean, a.mean(0))
    torch.testing.assert_close(layer.running_var, a.var(0, unbiased=False))
    y, _ = layer(b)
    mean = 0.9 * a.mean(0) + 0.1 * b.mean(0)
    var = 0.9 * a.var(0, unbiased=False) + 0.1 * b.var(0, unbiased=False)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)
    torch.testing.assert_close(y, (b - mean) / torch.sqrt(var + layer.eps))


def test_gradient_flows_only_through_the_current_batch_statistics():
    torch.manual_seed(2)
    rho = 0.9
    layer = BatchNormFlow(1, momentum=rho, affine=False).double()
    layer(torch.randn(16, 1, dtype=torch.float64) + 2)
    r_mean, r_var = layer.running_mean.clone(), layer.running_var.clone()
    w = torch.randn(16, 1, dtype=torch.float64)
    x = torch.randn(16, 1, dtype=torch.float64, requires_grad=True)
    (layer(x)[0] * w).sum().backward()
    # by hand: the stored history is a constant, the batch's share carries the gradient
    xr = x.detach().requires_grad_(True)
    mean = rho * r_mean + (1 - rho) * xr.mean(0)
    var = rho * r_var + (1 - rho) * (xr - xr.mean(0)).pow(2).mean(0)
    ((xr - mean) / torch.sqrt(var + layer.eps) * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    # ... which differs from treating the statistics as constants
    frozen = w / torch.sqrt(var.detach() + layer.eps)
    assert not torch.allclose(x.grad, frozen)


def test_inverse_uses_the_stored_averages_in_both_modes():
    torch.manual_seed(3)
    layer = _perturbed(3)
    x = torch.randn(10, 3, dtype=torch.float64)
    y, _ = layer(x)
    torch.testing.assert_close(layer.inverse(y), x)
    x2, logdet_inv = layer.eval().inverse_and_logdet(y)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(logdet_inv, -layer(x)[1])


def test_a_trained_model_evaluates_the_same_after_save_and_load():
    torch.manual_seed(4)
    cfg = RealNVPVectorConfig(dim=2, n_couplings=4, hidden=(16,), batchnorm=True)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.randn(64, 2) * torch.tensor([2.0, 0.5]) + 1
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = torch.randn(50, 2)
    before = model.log_prob(test)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = build_model(cfg)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.eval()
    torch.testing.assert_close(fresh.log_prob(test), before, rtol=0, atol=0)
    # the stored averages are what evaluation uses: they moved away from (0, 1)
    bn = [m for m in fresh.modules() if isinstance(m, BatchNormFlow)][0]
    assert not torch.allclose(bn.running_mean, torch.zeros(2), atol=1e-2)


def test_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="momentum"):
        BatchNormFlow(2, momentum=1.0)
    with pytest.raises(ValueError, match=r"expects \[B, 2\]"):
        BatchNormFlow(2)(torch.randn(4, 3))
