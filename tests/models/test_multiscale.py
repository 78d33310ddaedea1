"""The shared multi-scale builder assembles any family's steps with pluggable priors."""

from functools import partial

import pytest
import torch

from resflow.flow import Flow
from resflow.layers import ActNorm, ConditionalPrior, DiagonalPrior, FactorOut
from resflow.layers.coupling import ChannelMask, CheckerboardMask, Coupling
from resflow.layers.transformers import Affine
from resflow.models.multiscale import count_scales, multiscale
from resflow.nets.conditioners import ConvNet

from helpers import brute_logdet


def _coupling_step(i, shape):
    """A RealNVP-like step: ActNorm, checkerboard and channel couplings."""
    net = partial(ConvNet, hidden=4)
    return [
        ActNorm(shape[0]),
        Coupling.build(shape, CheckerboardMask(), Affine(), net),
        Coupling.build(shape, ChannelMask(reverse=bool(i % 2)), Affine("sigmoid"), net),
    ]


def _prior(kind):
    def make(i, half, kept):
        if kind == "diagonal":
            return DiagonalPrior(half)
        net = torch.nn.Conv2d(kept[0], 2 * half[0], 3, padding=1)
        return ConditionalPrior(net)

    return None if kind == "standard" else make


@pytest.mark.parametrize("prior", ["standard", "diagonal", "conditional"])
def test_builder_with_couplings_and_each_prior(prior):
    torch.manual_seed(0)
    shape = (2, 8, 8)
    layers = multiscale(shape, count_scales(shape, 3), _coupling_step, factor_out=True,
                        prior=_prior(prior))  # fmt: skip
    flow = Flow(layers, shape)
    assert flow.latent_shape == (2 * 8 * 8,)
    n_factor = sum(isinstance(m, FactorOut) for m in flow.modules())
    assert n_factor == 1  # 8x8 -> 4x4: two scales, one split between them
    x = torch.randn(3, *shape)
    flow(x)  # ActNorm initialisation
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flow = flow.double()
    x = x.double()
    z, logdet = flow(x)
    torch.testing.assert_close(flow.inverse(z), x)
    torch.testing.assert_close(logdet, brute_logdet(flow, x))
    back, logdet_inv = flow.layers.inverse_and_logdet(z)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(logdet_inv, -logdet)


def test_count_scales_and_errors():
    assert count_scales((1, 28, 28), 3) == 3  # 28, 14, 7
    assert count_scales((3, 32, 32), 3, squeeze_first=True) == 3  # 16, 8, 4
    assert count_scales((1, 8, 8), 5) == 2
    with pytest.raises(ValueError, match="too small"):
        multiscale((1, 2, 2), 0, _coupling_step)
    with pytest.raises(ValueError, match="divisible by 2, got 7x7"):
        multiscale((1, 14, 14), 3, lambda i, s: [ActNorm(s[0])])
