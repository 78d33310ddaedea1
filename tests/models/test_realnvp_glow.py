"""RealNVP and Glow: the papers' architectures as presets, zero initialisation,
the training penalty, temperature sampling and a short fit on 2-D data."""

from __future__ import annotations

import math

import pytest
import torch

from resflow.data.toy2d import sample_toy
from resflow.distributions import StandardNormal
from resflow.latent import latent_parts
from resflow.layers.batchnorm import BatchNormFlow
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import ChannelMask, CheckerboardMask, Coupling
from resflow.layers.multiscale import ConditionalPrior
from resflow.models import build_model, count_parameters, get_preset
from resflow.models.glow import GlowConfig, GlowTopPrior
from resflow.models.registry import PRESETS
from resflow.nets.glow import GlowNet, edge_pad
from resflow.nets.realnvp import RealNVPResNet, weight_scales
from resflow.training.objectives import Batch, MaximumLikelihood


def _couplings(model):
    return [m for m in model.modules() if isinstance(m, Coupling)]


def _meta(name: str, **overrides):  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        return build_model(get_preset(name, **overrides))


def test_realnvp_scales_follow_the_paper():
    model = _meta("realnvp-imagenet32")
    masks = [c.mask for c in _couplings(model)]
    kinds = "".join("k" if isinstance(m, CheckerboardMask) else "c" for m in masks)
    # 3 checkerboard, squeeze, 3 channel-wise, factor out -- three times -- then 4 checkerboard
    assert kinds == "kkkccc" * 3 + "kkkk"
    flags = [m.reverse for m in masks]
    for start, n in [(0, 3), (3, 3), (6, 3), (9, 3), (12, 3), (15, 3), (18, 4)]:
        assert flags[start : start + n] == [j % 2 == 1 for j in range(n)]  # alternating
    # the last scale works on 4x4 inputs: every split halves the remaining dimensions
    assert latent_parts(model) == [1536, 768, 384, 384]
    assert sum(isinstance(m, BatchNormFlow) for m in model.modules()) == len(masks)
    nets = [c.conditioner for c in _couplings(model)]
    assert all(isinstance(n, RealNVPResNet) and len(n.units) == 4 for n in nets)
    # §3.6: the feature maps double as the resolution halves (the authors' code: the
    # channel-wise couplings after a scale's squeeze already use the doubled width)
    widths = [n.stem.out_channels for n in nets]
    assert widths == [32] * 3 + [64] * 3 + [64] * 3 + [128] * 3 + [128] * 3 + [256] * 3 \
        + [256] * 4  # fmt: skip


def _count(name: str, **overrides) -> int:  # type: ignore[no-untyped-def]
    return count_parameters(_meta(name, **overrides))


def test_realnvp_cifar10_has_one_downscale_and_wider_nets():
    model = _meta("realnvp-cifar10")
    assert latent_parts(model) == [1536, 1536]
    nets = [c.conditioner for c in _couplings(model)]
    assert all(len(n.units) == 8 for n in nets)
    assert [n.stem.out_channels for n in nets] == [64] * 3 + [128] * 3 + [128] * 4
    assert _count("realnvp-cifar10") == 19_552_739
    assert _count("realnvp-cifar10", double_features=False) == 6_368_099  # 64 everywhere


def test_realnvp_paper_presets_double_and_state_their_counts():
    for name, count in [("realnvp-imagenet32", 46_052_973), ("realnvp-imagenet64", 95_574_053),
                        ("realnvp-celeba", 95_574_053)]:  # fmt: skip
        assert get_preset(name).double_features
        assert _count(name) == count
        assert f"{count:,} parameters" in PRESETS.get(name).description
    assert not get_preset("realnvp-digits").double_features


def test_glow_cifar10_is_k32_l3_with_512_channels():
    model = _meta("glow-cifar10")
    assert sum(isinstance(m, InvertibleConv1x1) for m in model.modules()) == 96
    assert not any(m.lu for m in model.modules() if isinstance(m, InvertibleConv1x1))
    couplings = _couplings(model)
    assert len(couplings) == 96 and all(isinstance(c.mask, ChannelMask) for c in couplings)
    assert all(isinstance(c.conditioner, GlowNet) for c in couplings)
    assert couplings[0].conditioner.net[0].out_channels == 512
    assert latent_parts(model) == [1536, 768, 768]  # split after levels 1 and 2
    priors = [m for m in model.modules() if isinstance(m, ConditionalPrior)]
    assert len(priors) == 2
    # the learned prior is on the top latent (48 x 4 x 4) only: the base has no parameters
    tops = [m for m in model.modules() if isinstance(m, GlowTopPrior)]
    assert len(tops) == 1 and tops[0].shape == (48, 4, 4)
    assert isinstance(model.base, StandardNormal) and not list(model.base.parameters())
    # the authors' count, reckoned layer by layer from openai/glow (edge channels included)
    assert count_parameters(model) == 44_603_604
    assert _count("glow-imagenet32") == 66_861_588
    assert _count("glow-imagenet64") == 112_377_540


def test_glow_top_prior_is_per_channel_away_from_the_border():
    torch.manual_seed(0)
    prior = GlowTopPrior((2, 4, 4), learn=True, n_classes=3).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.tensor([0, 2, 2]), 3).double()
    mu, log_sigma = prior.params(x, y)
    # inside (no 3x3 window reaches the border) only the bias and the label act
    conv = prior.conv
    inner = conv.conv.bias * torch.exp(3 * conv.log_scale)  # type: ignore[union-attr]
    label = prior.label(y) * torch.exp(3 * prior.label_log_scale)  # type: ignore[misc]
    expect = (inner + label)[:, :, None, None].expand(3, 4, 2, 2)
    torch.testing.assert_close(torch.cat([mu, log_sigma], 1)[:, :, 1:3, 1:3], expect)
    # a corner sees the border: the edge channel's weights move it
    assert float((mu[:, :, 0, 0] - mu[:, :, 1, 1]).abs().max().detach()) > 1e-3
    assert torch.equal(mu[1], mu[2]) and not torch.equal(mu[0], mu[1])  # per label
    eps, logdet = prior(x, y)
    torch.testing.assert_close(eps, (x - mu) * torch.exp(-log_sigma))
    torch.testing.assert_close(logdet, -log_sigma.flatten(1).sum(1))
    torch.testing.assert_close(prior.inverse(eps, y), x)
    with pytest.raises(ValueError, match="one-hot labels"):
        prior(x)


def test_glow_with_the_authors_priors_round_trips_and_samples():
    torch.manual_seed(1)
    cfg = GlowConfig(image_shape=(1, 4, 4), levels=17, n_levels=2, depth=1, hidden=8,
                     n_classes=3, top_prior="authors", edge_bias=True, lu=False,
                     label_in_couplings=False)  # fmt: skip
    model = build_model(cfg).double()
    # the label reaches the top prior only (the authors' ycond)
    assert all(c.conditioner.context_channels == 0 for c in _couplings(model))
    assert get_preset("glow-cifar10").label_in_couplings is False
    x = torch.randint(0, 17, (4, 1, 4, 4)).double()
    labels = torch.tensor([0, 1, 2, 1])
    model(x, labels)  # data-dependent initialisation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert torch.isfinite(model.log_prob(x, labels)).all()
    samples = model.sample(4, context=labels)
    assert samples.shape == (4, 1, 4, 4)
    # no learned parameters outside the split priors and the top prior's: the base is N(0, I)
    assert isinstance(model.base, StandardNormal)
    assert sum(isinstance(m, GlowTopPrior) for m in model.modules()) == 1


def test_edge_pad_marks_the_padding():
    x = torch.randn(2, 3, 2, 3)
    y = edge_pad(x)
    assert y.shape == (2, 4, 4, 5)
    torch.testing.assert_close(y[:, :3, 1:-1, 1:-1], x)
    ring = torch.ones(4, 5)
    ring[1:-1, 1:-1] = 0
    assert torch.equal(y[0, 3], ring) and torch.equal(y[1, 3], ring)


@pytest.mark.parametrize("kind", ["affine", "additive"])
def test_zero_initialised_glow_coupling(kind):
    torch.manual_seed(0)
    model = build_model(get_preset("glow-digits", coupling=kind, depth=1, n_levels=1))
    coupling = _couplings(model)[0]
    x = torch.randn(5, 4, 4, 4)
    y, logdet = coupling(x)
    torch.testing.assert_close(y[:, :2], x[:, :2], rtol=0, atol=0)
    if kind == "additive":  # the identity
        torch.testing.assert_close(y, x, rtol=0, atol=0)
        torch.testing.assert_close(logdet, torch.zeros(5))
    else:  # h = t = 0: the formula's constant scale sigmoid(0 + 2)
        s = torch.sigmoid(torch.tensor(2.0))
        torch.testing.assert_close(y[:, 2:], s * x[:, 2:])
        torch.testing.assert_close(logdet, torch.full((5,), 2 * 16 * math.log(s)))


def test_realnvp_penalty_is_l2_on_the_weight_norm_scales():
    torch.manual_seed(0)
    model = build_model(get_preset("realnvp-digits"))
    scales = list(weight_scales(model))
    assert scales and all(g.shape[1:] == (1, 1, 1) for g in scales)
    expected = 5e-5 * sum(float(g.detach().pow(2).sum()) for g in scales)
    assert float(model.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    x = torch.randint(0, 17, (8, 1, 8, 8))
    model.eval()
    torch.manual_seed(1)  # the same dequantization noise for both
    loss, _ = MaximumLikelihood(model)(model, Batch(x))
    torch.manual_seed(1)
    assert float((loss - model.bits_per_dim(x).mean()).detach()) == pytest.approx(
        expected, rel=1e-4
    )
    assert float(build_model(get_preset("realnvp-digits", scale_l2=0.0)).penalty().detach()) == 0.0


def test_temperature_scales_the_latent():
    torch.manual_seed(0)
    model = build_model(get_preset("glow-digits"))
    z = model.sample_latent(20000, temperature=0.5)
    # the top prior starts at N(0, 1)
    assert float(z.std().detach()) == pytest.approx(0.5, rel=0.02)
    model.eval()
    a, b = model.sample(2, temperature=0.0), model.sample(2, temperature=0.0)
    torch.testing.assert_close(a, b)  # temperature 0 decodes the prior's mean


@pytest.mark.parametrize("preset", ["realnvp-toy2d", "glow-toy2d"])
def test_vector_models_fit_8gaussians(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    test = sample_toy("8gaussians", 2000, torch.Generator().manual_seed(1)).float()
    start = float(-model.log_prob(test).mean().detach())
    for step in range(150):
        x = sample_toy("8gaussians", 256, torch.Generator().manual_seed(100 + step)).float()
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = float(-model.log_prob(test).mean().detach())
    assert end < start and end < 3.6  # entropy 2.83; the best Gaussian: 4.3
