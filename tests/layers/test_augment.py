"""Noise augmentation and DenseFlow's dense blocks by the stochastic-layer rule: the
logdet is ``log|det dy/d(x, e)| - log N(e)`` (against the brute-force Jacobian of the
map with the noise held fixed); with ``sigma = 1, mu = 0`` the augmentation adds
exactly ``-log N(e)`` and nothing else; the inverse drops the noise and
``inverse_and_logdet`` returns minus the forward term; the bound is below the exact
log-density of a Gaussian model and its importance-weighted version climbs to it."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from resflow.distributions import StandardNormal
from resflow.evaluation import evaluate_bounds
from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.augment import (
    DenseAugmentedBlock,
    NoiseAugmentation,
    standard_normal_log_prob,
)
from resflow.layers.base import Sequential
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.nets.denseflow import CrossUnitNet

from helpers import brute_logdet


def _perturb(module: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _image_block() -> DenseAugmentedBlock:
    """Three units on 2 -> 3 -> 4 channels, couplings conditioned on all earlier ones."""
    units = [Sequential(ActNorm(c), InvertibleConv1x1(c, lu=False)) for c in (2, 3, 4)]
    augs = [
        NoiseAugmentation(1, CrossUnitNet(2, 1, 2)),
        NoiseAugmentation(1, CrossUnitNet(4, 1, 2)),
    ]
    block = DenseAugmentedBlock(units, augs)
    block(torch.randn(8, 2, 3, 3))  # ActNorm initialisation
    _perturb(block)
    return block


def test_logdet_is_the_jacobian_of_x_and_e_minus_log_n_e():
    aug = NoiseAugmentation(2, CrossUnitNet(3, 2, 2)).double()
    _perturb(aug)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    e = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    y, logdet = aug.augment(x, x, e)
    for i in range(len(x)):

        def f(xe, i=i):  # type: ignore[no-untyped-def]
            xi, ei = xe[:, :3], xe[:, 3:]
            return aug.augment(xi, xi, ei)[0], None

        ld = brute_logdet(f, torch.cat([x[i : i + 1], e[i : i + 1]], 1))
        expected = ld[0] - standard_normal_log_prob(e[i : i + 1])[0]
        torch.testing.assert_close(logdet[i], expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("net", ["none", "zero"])
def test_with_unit_sigma_and_zero_mu_it_adds_only_the_noise_bookkeeping(net):
    aug = NoiseAugmentation(3, None if net == "none" else CrossUnitNet(2, 3))  # zero at start
    x = torch.randn(5, 2, 4, 4)
    torch.manual_seed(7)
    y, logdet = aug(x)
    torch.manual_seed(7)
    e = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(y, torch.cat([x, e], 1), atol=0, rtol=0)  # sigma e + mu = e
    torch.testing.assert_close(logdet, -standard_normal_log_prob(e), atol=0, rtol=0)
    # with a standard normal after it the bound is tight: exactly log N(x) for every draw
    model = Flow([aug], (2, 4, 4), base=StandardNormal((5, 4, 4)))
    for seed in range(3):
        torch.manual_seed(seed)
        torch.testing.assert_close(model.log_prob(x), standard_normal_log_prob(x))


@pytest.mark.parametrize("what", ["augmentation", "block"])
def test_inverse_drops_the_noise_and_inverse_and_logdet_negates_the_forward_term(what):
    torch.manual_seed(0)
    if what == "augmentation":
        layer = NoiseAugmentation(2, CrossUnitNet(2, 2, 2))
        _perturb(layer)
    else:
        layer = _image_block()
    layer = layer.double()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    y, logdet = layer(x)
    assert layer.stochastic
    assert tuple(y.shape[1:]) == layer.output_shape((2, 3, 3)) == (4, 3, 3)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-10, rtol=1e-10)
    x_back, logdet_inv = layer.inverse_and_logdet(y)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-10, rtol=1e-10)


def test_block_conditions_each_coupling_on_every_earlier_representation():
    """The second coupling's net sees [z_0, z_1]: changing z_0 alone (through a unit
    that ignores it) still moves the noise of the second coupling."""
    torch.manual_seed(0)
    block = _image_block()
    seen = []
    net = block.augmentations[1].net
    hook = net.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    block(torch.randn(2, 2, 3, 3))
    hook.remove()
    assert seen == [2 + 2]  # z_0 (2 channels) and z_1 (2 channels, without its noise)
    torch.manual_seed(3)
    x = torch.randn(2, 2, 3, 3)
    y, ld = block(x)
    y.pow(2).sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_block_errors_and_state_dict():
    unit = Sequential(ActNorm(2))
    with pytest.raises(ValueError, match="needs 1 augmentations"):
        DenseAugmentedBlock([unit, Sequential(ActNorm(3))], [])
    with pytest.raises(ValueError, match="growth must be >= 1"):
        NoiseAugmentation(0)
    with pytest.raises(ValueError, match="changes its shape"):
        DenseAugmentedBlock([Sequential(ActNorm(2)), NoiseAugmentation(1)],
                            [NoiseAugmentation(1)]).output_shape((2, 3, 3))  # fmt: skip
    block = _image_block()
    buf = io.BytesIO()
    torch.save(block.state_dict(), buf)
    buf.seek(0)
    fresh = _image_block()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 2, 3, 3)
    torch.manual_seed(1)
    a = block(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fresh(x), a)


def _gaussian_toy() -> tuple[Flow, float, float, torch.Tensor]:
    """``x`` (1-D) -> ActNorm -> augment with ``sigma e + mu(x)`` -> a 2x2 linear map ->
    N(0, I): ``[z_1, e~]`` is Gaussian with covariance ``(W^T W)^-1``, so ``log p(x)``
    is known exactly."""
    torch.manual_seed(0)
    act = ActNorm(1)
    act.initialized.fill_(True)
    mix = InvertibleConv1x1(2, lu=False)
    block = DenseAugmentedBlock([Sequential(act), Sequential(mix)],
                                [NoiseAugmentation(1, nn.Linear(1, 2))])  # fmt: skip
    with torch.no_grad():
        act.bias.fill_(0.3)
        act.log_scale.fill_(-0.4)
        mix.weight.copy_(torch.tensor([[1.2, 0.7], [-0.3, 0.9]]))
        block.augmentations[0].net.weight.copy_(torch.tensor([[0.2], [0.5]]))
        block.augmentations[0].net.bias.copy_(torch.tensor([0.1, -0.2]))
    model = Flow([block], (1,), base=StandardNormal(2)).double()
    w = mix.weight.detach().double()
    cov = torch.linalg.inv(w.T @ w)
    return model, float(cov[0, 0]), float(act.log_scale.detach()), torch.tensor(0.3)


def _exact_log_p(x: torch.Tensor, var: float, log_a: float, b: torch.Tensor) -> torch.Tensor:
    z1 = (x[:, 0] + b) * math.exp(log_a)
    return -0.5 * (z1.pow(2) / var + math.log(2 * math.pi * var)) + log_a


def test_the_bound_is_below_log_p_and_the_importance_weighted_bound_climbs_to_it():
    model, var, log_a, b = _gaussian_toy()
    x = torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64)
    exact = _exact_log_p(x, var, log_a, b.double())
    torch.manual_seed(0)
    logp = model.log_prob(x.repeat_interleave(20000, 0)).view(3, 20000)
    elbo, se = logp.mean(1), logp.std(1) / math.sqrt(20000)
    assert (elbo < exact - 10 * se).all()  # a strict bound: q(e | x) is not the posterior
    iw = torch.logsumexp(logp, 1) - math.log(20000)  # K = 20000: nearly tight
    assert ((iw - exact).abs() < 0.02 * (exact - elbo)).all()


def test_importance_weighted_bound_increases_with_k():
    model, *_ = _gaussian_toy()
    data = torch.full((400, 1), 0.8, dtype=torch.float64)
    results = {}
    for k in (1, 4, 32):
        torch.manual_seed(k)
        results[k] = evaluate_bounds(model, data, k=k, batch_size=4096)
    assert results[1].iw.unit == "nats"
    assert abs(results[1].iw.mean - results[1].elbo.mean) < 1e-12
    for a, c in ((1, 4), (4, 32)):  # the negative log-likelihood bound falls
        drop = results[a].iw.mean - results[c].iw.mean
        assert drop > 3 * math.hypot(results[a].iw.stderr, results[c].iw.stderr)
