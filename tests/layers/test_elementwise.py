import math

import pytest
import torch

from resflow.evaluation import bits_per_dim
from resflow.layers.elementwise import Dequantize, LogitTransform, RandomHorizontalFlip, ReduceBits
from resflow.layers.squeeze import Squeeze

from helpers import brute_logdet


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
def test_logit_logdet_equals_autograd(alpha):
    y = torch.rand(3, 2, 2, 2, dtype=torch.float64) * 0.98 + 0.01
    layer = LogitTransform(alpha)
    z, logdet = layer(y)
    torch.testing.assert_close(logdet, brute_logdet(layer, y))
    torch.testing.assert_close(layer.inverse(z), y)


def test_dequantize_range_and_inverse():
    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    y, logdet = Dequantize(256)(x)
    assert (y >= 0).all() and (y < 1).all() and (logdet == 0).all()
    torch.testing.assert_close(Dequantize(256).inverse(y), x.float())
    with pytest.raises(ValueError, match=r"integer levels in \[0, 16\]"):
        Dequantize(17)(torch.full((1, 1, 2, 2), 17))


def test_reduce_bits():
    x = torch.tensor([0, 7, 8, 255])
    y, _ = ReduceBits(5)(x.view(1, 4))
    assert y.flatten().tolist() == [0, 0, 1, 31]


def test_flip_only_in_training():
    x = torch.arange(8.0).view(1, 1, 2, 4).repeat(64, 1, 1, 1)
    layer = RandomHorizontalFlip()
    y, logdet = layer(x)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert 10 < int(flipped.sum()) < 54 and (logdet == 0).all()
    layer.eval()
    assert torch.equal(layer(x)[0], x)


def test_squeeze_needs_divisible_size():
    with pytest.raises(ValueError, match="divisible by 2, got 5x4"):
        Squeeze(2)(torch.randn(1, 1, 5, 4))


def test_bits_per_dim_of_uniform_model_is_8():
    d = 3 * 4 * 4
    assert float(bits_per_dim(torch.zeros(5), d, 256).mean()) == pytest.approx(8.0)


def test_bits_per_dim_by_hand_for_a_known_density():
    """A standard normal in logit space: log p(y) = log N(logit(y)) + logit logdet."""
    torch.manual_seed(0)
    y = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    z = torch.log(y) - torch.log1p(-y)
    logdet_by_hand = (-torch.log(y) - torch.log1p(-y)).flatten(1).sum(1)
    log_n = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    d = 4
    by_hand = -(log_n + logdet_by_hand - d * math.log(256)) / (d * math.log(2))
    zz, ld = LogitTransform(0.0)(y)
    lib = bits_per_dim(-0.5 * (zz**2 + math.log(2 * math.pi)).flatten(1).sum(1) + ld, d, 256)
    torch.testing.assert_close(lib, by_hand)
