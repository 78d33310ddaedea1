import math

import pytest
import torch

from resflow.evaluation import bits_per_dim
from resflow.layers.squeeze import Squeeze
from resflow.preprocess import (
    LogitTransform,
    RandomHorizontalFlip,
    ReduceBits,
    UniformDequantizer,
    image_preprocessing,
    reduce_bits,
)

from helpers import brute_logdet


@pytest.mark.parametrize("alpha", [1e-6, 0.05, 0.3])
def test_logit_logdet_equals_autograd(alpha):
    y = torch.rand(3, 2, 2, 2, dtype=torch.float64) * 0.98 + 0.01
    layer = LogitTransform(alpha)
    z, logdet = layer(y)
    torch.testing.assert_close(logdet, brute_logdet(layer, y))
    torch.testing.assert_close(layer.inverse(z), y)


def test_dequantize_range_logdet_and_inverse():
    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    deq = UniformDequantizer(256)
    y, logdet = deq(x)
    assert (y >= 0).all() and (y < 1).all()
    # the dequantizer owns the -D log L term of bits/dim
    torch.testing.assert_close(logdet, torch.full((16,), -16 * math.log(256)))
    torch.testing.assert_close(deq.inverse(y), x.float())
    back, inv_logdet = deq.inverse_and_logdet(y)
    torch.testing.assert_close(back, x.float())
    torch.testing.assert_close(inv_logdet, -logdet)
    assert deq.stochastic


def test_dequantization_noise_fills_each_bin_uniformly():
    """u ~ U[0, 1): the whole bin, mean 1/2, variance 1/12 (half-width noise fails)."""
    torch.manual_seed(0)
    x = torch.full((20_000, 1, 1, 1), 3, dtype=torch.uint8)
    u = UniformDequantizer(17)(x)[0].flatten() * 17 - 3
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert float(u.min()) < 1e-3 and float(u.max()) > 1 - 1e-3
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.003)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((1, 1, 2, 2), 17), r"integer levels in \[0, 16\]"),
        (torch.full((1, 1, 2, 2), -1), r"integer levels in \[0, 16\]"),
        (torch.full((1, 1, 2, 2), 2.5), "non-integer values"),
    ],
)
def test_dequantize_refuses_values_that_are_not_levels(bad, message):
    with pytest.raises(ValueError, match=message):
        UniformDequantizer(17)(bad)


def test_reduce_bits_is_one_function_for_layer_and_loader():
    x = torch.tensor([0, 7, 8, 255])
    y, _ = ReduceBits(5)(x.view(1, 4))
    assert y.flatten().tolist() == [0, 0, 1, 31]
    assert reduce_bits(x.to(torch.uint8), 5).tolist() == [0, 0, 1, 31]
    with pytest.raises(ValueError, match="n_bits must be in 1..8"):
        reduce_bits(x, 0)


def test_flip_only_in_training():
    x = torch.arange(8.0).view(1, 1, 2, 4).repeat(64, 1, 1, 1)
    layer = RandomHorizontalFlip()
    y, logdet = layer(x)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert 10 < int(flipped.sum()) < 54 and (logdet == 0).all()
    layer.eval()
    assert torch.equal(layer(x)[0], x)


def test_image_pipeline_order():
    names = [type(m).__name__ for m in image_preprocessing(256, 0.05, horizontal_flip=True)]
    assert names == ["UniformDequantizer", "RandomHorizontalFlip", "LogitTransform"]
    names = [type(m).__name__ for m in image_preprocessing(256, normalize=((0.5,), (0.2,)))]
    assert names == ["UniformDequantizer", "Normalize"]


def test_squeeze_needs_divisible_size():
    with pytest.raises(ValueError, match="divisible by 2, got 5x4"):
        Squeeze(2)(torch.randn(1, 1, 5, 4))


def test_bits_per_dim_of_uniform_model_is_8():
    d = 3 * 4 * 4
    assert float(bits_per_dim(torch.zeros(5), d, 256).mean()) == pytest.approx(8.0)


def test_bits_per_dim_by_hand_for_a_known_density():
    """A standard normal in logit space: log p(y) = log N(logit(s)) + logit logdet, with
    s = alpha + (1 - 2 alpha) y."""
    torch.manual_seed(0)
    y = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    alpha = 0.05
    s = alpha + (1 - 2 * alpha) * y
    z = torch.log(s) - torch.log1p(-s)
    logdet_by_hand = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    log_n = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    d = 4
    by_hand = -(log_n + logdet_by_hand - d * math.log(256)) / (d * math.log(2))
    zz, ld = LogitTransform(alpha)(y)
    lib = bits_per_dim(-0.5 * (zz**2 + math.log(2 * math.pi)).flatten(1).sum(1) + ld, d, 256)
    torch.testing.assert_close(lib, by_hand)
