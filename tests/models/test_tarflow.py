"""TarFlow models: the paper's ImageNet 64 architecture, the two training modes (the
likelihood of noisy data is said to be one), cached sampling, classifier-free guidance
on whole models, and the one-step denoising against the exact Tweedie formula."""

from __future__ import annotations

import math

import pytest
import torch

from resflow.evaluation import decode, density_note, evaluate
from resflow.flow import Flow
from resflow.layers.base import Sequential
from resflow.layers.guidance import ContextDropout
from resflow.layers.multiscale import Flatten
from resflow.layers.patch import Patchify
from resflow.layers.tarflow import TarFlowBlock, without_cache
from resflow.models import build_model, count_parameters, get_preset
from resflow.models.tarflow import TarFlowConfig
from resflow.nets.transformer import CausalTransformer
from resflow.preprocess import GaussianNoise, Normalize, UniformDequantizer
from resflow.preprocess.noise import QuantizedGaussianNoise

TINY = dict(image_shape=(1, 4, 4), levels=17, patch_size=2, width=16, n_blocks=2, depth=1,
            heads=2)  # fmt: skip


def _perturbed(model: Flow, scale: float = 0.1) -> Flow:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def test_imagenet64_preset_is_the_papers_likelihood_architecture():
    cfg = get_preset("tarflow-imagenet64")
    with torch.device("meta"):  # 460M parameters: counted, not allocated
        model = build_model(cfg)
    blocks = [m for m in model.modules() if isinstance(m, TarFlowBlock)]
    assert [b.flip for b in blocks] == [False, True] * 4
    net = blocks[0].net
    assert len(net.layers) == 8 and net.position.shape == (1024, 768)  # 32x32 patches of 2x2
    assert net.embed.in_features == 12 and net.head.out_features == 24
    assert count_parameters(model) == 460_161_216
    assert count_parameters(build_model(get_preset("tarflow-digits"))) == 408_096
    assert count_parameters(build_model(get_preset("tarflow-mnist"))) == 933_632


def test_likelihood_mode_and_noise_mode_layers():
    plain = build_model(TarFlowConfig(**TINY))
    kinds = [type(m) for m in plain.layers.layers]
    assert kinds[:2] == [UniformDequantizer, Normalize] and density_note(plain) == ""
    noisy = build_model(TarFlowConfig(**TINY, noise_std=0.1))
    noise = noisy.layers.layers[1]
    assert isinstance(noise, GaussianNoise) and noise.std == pytest.approx(0.05)  # on [0, 1)
    assert isinstance(noisy.layers.layers[2], Normalize)
    x = torch.randint(0, 17, (200, 1, 4, 4))
    result = evaluate(noisy, x)
    assert "of the noisy data" in str(result) and "bits/dim (n=200)" in str(result)
    assert "noisy" not in str(evaluate(plain, x))
    # the noise: y - x on the dequantized scale has the uniform's and the noise's variance
    noise.train()
    y = noisy.layers.layers[0](x.float())[0]
    spread = noise(y)[0] - y
    assert float(spread.std()) == pytest.approx(0.05, rel=0.05)
    torch.testing.assert_close(noise.inverse(y), y, rtol=0, atol=0)


def test_cached_sampling_equals_uncached_sampling():
    torch.manual_seed(0)
    model = _perturbed(build_model(TarFlowConfig(**TINY)))
    body = model.layers.layers[-1]  # after dequantization and normalization
    z = model.sample_latent(5)
    with torch.no_grad():
        cached = body.inverse(z)
        with without_cache(model):
            uncached = body.inverse(z)
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(body(cached)[0], z, atol=1e-4, rtol=1e-4)
        torch.manual_seed(3)
        a = model.sample(4)
        torch.manual_seed(3)
        with without_cache(model):
            b = model.sample(4)
    torch.testing.assert_close(a, b)


def test_class_conditional_model_guidance_and_label_dropout():
    torch.manual_seed(0)
    model = build_model(TarFlowConfig(**TINY, n_classes=3, label_dropout=0.2))
    body = model.layers.layers[-1]
    assert isinstance(body, ContextDropout) and body.p == 0.2
    assert not isinstance(build_model(TarFlowConfig(**TINY, n_classes=3, label_dropout=0.0))
                          .layers.layers[-1], ContextDropout)  # fmt: skip
    model = _perturbed(model, 0.3)
    labels = torch.tensor([0, 1, 2, 1])
    z = model.sample_latent(4, context=labels)
    null = body.inverse(z, torch.zeros(4, 3))  # the null class, decoded by hand
    cond = body.inverse(z, model.condition(labels, 4))
    assert not torch.allclose(null, cond, atol=1e-3)
    head = Sequential(list(model.layers.layers[:-1]))
    torch.testing.assert_close(decode(model, z, labels, guidance=0.0), head.inverse(null))
    torch.testing.assert_close(decode(model, z, labels, guidance=1.0), head.inverse(cond))
    guided = decode(model, z, labels, guidance=4.0)
    assert not torch.equal(guided, head.inverse(cond))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        decode(build_model(TarFlowConfig(**TINY)), z, guidance=2.0)
    with pytest.raises(ValueError, match="trained without noise augmentation"):
        decode(model, z, labels, denoise=True)


def _gaussian_tarflow(mean: float, std: float, sigma: float) -> Flow:
    """A flow whose density of the noisy data is exactly N(mean, std^2) per pixel: one
    block whose network outputs the constants alpha = log std, mu = mean."""
    net = CausalTransformer(1, 2, tokens=4, width=8, depth=1, heads=1)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([math.log(std), mean]))
    layers = [GaussianNoise(sigma), Patchify((1, 2, 2), 1), TarFlowBlock(net), Flatten((4, 1))]
    return Flow(Sequential(layers), (1, 2, 2)).eval()


def test_denoising_is_tweedies_formula_on_a_gaussian():
    """Clean x ~ N(m, s^2), y = x + sigma eps ~ N(m, s^2 + sigma^2): the score is exact,
    and E[x | y] = y - sigma^2 (y - m) / (s^2 + sigma^2) halves the error here."""
    m, s, sigma = 0.5, 0.2, 0.2
    model = _gaussian_tarflow(m, math.sqrt(s**2 + sigma**2), sigma)
    gen = torch.Generator().manual_seed(0)
    x = m + s * torch.randn(20000, 1, 2, 2, generator=gen)
    y = x + sigma * torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        z = Sequential(list(model.layers.layers[1:]))(y)[0]
    x_hat = decode(model, z, denoise=True)
    tweedie = y - sigma**2 * (y - m) / (s**2 + sigma**2)
    torch.testing.assert_close(x_hat, tweedie, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode(model, z), y, atol=1e-5, rtol=1e-5)  # no denoising
    before, after = (y - x).pow(2).mean(), (x_hat - x).pow(2).mean()
    optimum = s**2 * sigma**2 / (s**2 + sigma**2)  # the posterior variance
    assert float(before) == pytest.approx(sigma**2, rel=0.03)
    assert float(after) == pytest.approx(optimum, rel=0.03)


def _meta(name: str) -> Flow:
    with torch.device("meta"):
        return build_model(get_preset(name))


@pytest.mark.parametrize(
    ("name", "shape", "patch", "width", "heads", "sigma", "classes", "count"),
    [
        ("tarflow-imagenet64-noise", (3, 64, 64), 2, 768, 12, 0.05, 0, 460_161_216),
        ("tarflow-imagenet64-cond", (3, 64, 64), 2, 768, 12, 0.05, 1000, 466_311_360),
        ("tarflow-afhq256", (3, 256, 256), 8, 768, 12, 0.07, 3, 463_506_432),
        ("tarflow-imagenet128", (3, 128, 128), 4, 1024, 16, 0.15, 1000, 823_960_320),
    ],
)
def test_sample_quality_presets_are_the_papers(
    name, shape, patch, width, heads, sigma, classes, count
):  # type: ignore[no-untyped-def]
    cfg = get_preset(name)
    assert (cfg.image_shape, cfg.patch_size, cfg.width, cfg.heads) == (shape, patch, width, heads)
    assert (cfg.n_blocks, cfg.depth, cfg.noise_std, cfg.noise_mode) == (8, 8, sigma, "official")
    assert cfg.n_classes == classes and cfg.horizontal_flip
    assert width // heads == 64  # the authors' heads of 64 channels
    if classes:
        assert cfg.label_dropout == 0.1
    model = _meta(name)
    assert count_parameters(model) == count
    first = model.layers.layers[0]
    assert isinstance(first, QuantizedGaussianNoise) and first.std == pytest.approx(sigma / 2)
    assert not any(isinstance(m, UniformDequantizer) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, TarFlowBlock)]
    tokens = (shape[1] // patch) ** 2
    assert len(blocks) == 8 and blocks[0].net.position.shape == (tokens, width)


def test_official_noise_mode_adds_no_uniform_noise():
    layer = QuantizedGaussianNoise(17, 1e-7)
    x = torch.randint(0, 17, (50, 1, 4, 4)).float()
    y, logdet = layer(x)
    # a tiny sigma leaves the levels on their grid: no uniform spread within the bins
    assert float((y * 16 - x).abs().max()) < 1e-4
    torch.testing.assert_close(logdet, torch.full((50,), -16 * math.log(16)))
    torch.testing.assert_close(layer.inverse(y), x)
    # the dequantized mode spreads the same data over whole bins
    plain = UniformDequantizer(17)(x)[0] * 17 - x
    assert float(plain.max()) > 0.5
    with pytest.raises(ValueError, match="integer levels"):
        layer(x + 0.5)


def test_official_noise_mode_log_density_is_that_of_the_noisy_levels():
    torch.manual_seed(0)
    sigma, levels = 0.2, 17
    model = build_model(TarFlowConfig(**TINY, noise_std=sigma, noise_mode="official")).eval()
    kinds = [type(m) for m in model.layers.layers[:2]]
    assert kinds == [QuantizedGaussianNoise, Normalize]
    x = torch.randint(0, levels, (6, 1, 4, 4))
    torch.manual_seed(1)
    log_p = model.log_prob(x)  # zero-initialised blocks: the identity into N(0, I)
    torch.manual_seed(1)
    eps = torch.randn(x.shape)
    z = 2 * (x / (levels - 1) + sigma / 2 * eps) - 1  # the authors' [-1, 1] data plus noise
    d = 16
    expect = -0.5 * (z**2).flatten(1).sum(1) - d / 2 * math.log(2 * math.pi)
    expect = expect + d * math.log(2) - d * math.log(levels - 1)  # per unit of the levels
    torch.testing.assert_close(log_p, expect)
    assert "without uniform dequantization" in density_note(model)
    # denoised decoding goes through the noise layer's own quantization
    out = decode(_perturbed(model, 0.02), torch.randn(4, 16), denoise=True)
    assert out.shape == (4, 1, 4, 4) and torch.equal(out, out.round())
    assert float(out.min()) >= 0 and float(out.max()) <= levels - 1


def test_official_noise_mode_config_errors():
    from resflow.config import ConfigError

    with pytest.raises(ConfigError, match="needs noise_std > 0"):
        TarFlowConfig(noise_mode="official")
    assert TarFlowConfig().noise_mode == "dequantized"  # runs saved before the field
