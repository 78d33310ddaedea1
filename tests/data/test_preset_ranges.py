"""The data range each preset assumes against the data and the papers: the levels of the
data sets it is the default for (the 17-level digits read from the real data; 8-bit
MNIST, Fashion-MNIST, CIFAR-10 and ImageNet; 5-bit CelebA-HQ of Residual Flows and
Glow), the logit's alpha of the papers (RealNVP 0.05; Residual Flows 0.05 on CIFAR-10,
ImageNet and CelebA-HQ, 1e-6 on MNIST in the authors' code), and the range the
normalizing families map the dequantized data to (Glow ``x / L - 1/2``, TarFlow
``[-1, 1]``) with the logdet of that affine map."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from resflow.data.images import load_images
from resflow.layers.base import Sequential
from resflow.models import PRESETS, build_model, get_preset
from resflow.preprocess import Dequantizer, LogitTransform, Normalize

EIGHT_BIT = {"mnist": 256, "fashion-mnist": 256, "cifar10": 256}


def _image_presets() -> list[str]:
    return [n for n, p in PRESETS.items() if hasattr(p.config, "levels")]


@functools.cache
def _digits_levels() -> int:
    """The levels of the real digits: their values are 0..16."""
    digits = load_images("digits", "train")
    assert int(digits.images.max()) == 16 and int(digits.images.min()) == 0
    assert digits.levels == 17
    return 17


def _expected_levels(name: str) -> int:
    if "digits" in name:
        return _digits_levels()
    if "celebahq" in name:
        return 32  # 5 bits
    return 256


@pytest.mark.parametrize("name", _image_presets())
def test_preset_levels_are_those_of_its_data(name):
    preset = PRESETS.get(name)
    assert preset.config.levels == _expected_levels(name), name
    for data in preset.default_for:
        if data == "digits":
            assert preset.config.levels == _digits_levels()
        elif data in EIGHT_BIT:
            assert preset.config.levels == EIGHT_BIT[data], (name, data)


def test_logit_alpha_of_the_papers():
    for name, preset in PRESETS.items():
        alpha = getattr(preset.config, "logit_alpha", None)
        if alpha is None or "digits" in name:
            continue
        if preset.model == "realnvp":
            assert alpha == 0.05, name
        if preset.model == "residual-flow":
            assert alpha == (1e-6 if "mnist" in name else 0.05), name


def _preprocessing(model) -> Sequential:  # type: ignore[no-untyped-def]
    layers = list(model.layers.layers)
    last = max(i for i, m in enumerate(layers) if isinstance(m, (Normalize, LogitTransform)))
    assert isinstance(layers[0], Dequantizer) and layers[0].levels == model.levels
    return Sequential(layers[1 : last + 1])


@pytest.mark.parametrize("name, lo, hi", [("glow-digits", -0.5, 0.5), ("tarflow-digits", -1, 1)])
def test_normalizing_presets_map_the_unit_interval_to_their_range(name, lo, hi):
    model = build_model(get_preset(name)).eval()
    chain = _preprocessing(model)
    d = math.prod(model.shape)
    ends = torch.stack([torch.zeros(model.shape), torch.ones(model.shape)])
    z, logdet = chain(ends)
    torch.testing.assert_close(z[0], torch.full(model.shape, float(lo)))
    torch.testing.assert_close(z[1], torch.full(model.shape, float(hi)))
    expected = d * math.log(hi - lo)  # an affine map of [0, 1] onto [lo, hi]
    torch.testing.assert_close(logdet, torch.full((2,), expected), atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in _image_presets() if "digits" in n])
def test_digits_presets_preprocess_with_their_levels(name):
    """Every digits preset dequantizes with the data's 17 levels, the levels its
    bits/dim are reported with (``Flow.levels``)."""
    model = build_model(get_preset(name))
    deq = model.layers.layers[0]
    assert isinstance(deq, Dequantizer) and deq.levels == model.levels == _digits_levels()
