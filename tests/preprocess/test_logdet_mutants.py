"""Preprocessing logdets checked where their terms cannot compensate each other: the whole
chain (dequantizer -> logit | normalize) against a brute-force Jacobian of a map written
out here by hand, at non-symmetric points in float64, with levels, dimensions, alpha and
per-channel scales chosen so that no two terms share a value or cancel (``prod(std) != 1``,
``D log L != D log(1 - 2 alpha)``); the base densities of the variational dequantizer
against ``torch.distributions``; Gaussian noise drawn in evaluation as in training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from resflow.layers.base import Sequential
from resflow.preprocess import (
    Dequantizer,
    GaussianNoise,
    LogitTransform,
    Normalize,
    VariationalDequantizer,
    image_preprocessing,
)


class _FixedNoise(Dequantizer):
    """The base class's scaling and logdet with a given noise ``u`` and ``log q`` (so
    the chain is a deterministic function of ``u`` for the brute-force Jacobian)."""

    def __init__(self, levels: int, u: Tensor, log_q: Tensor) -> None:
        super().__init__(levels)
        self.u, self.log_q = u, log_q

    def noise(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.u, self.log_q


def _jacobian_logdet(fn, u: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """``log|det d fn(u_i) / d u_i|`` per sample (dense autograd Jacobian)."""
    out = []
    for ui in u:
        jac = torch.autograd.functional.jacobian(fn, ui).reshape(ui.numel(), ui.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def _noise_jacobian_logdet(fn, u: Tensor, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """``log|det d fn(u_i, x_i) / d u_i|`` per sample, the data ``x_i`` held fixed."""
    return torch.stack(
        [_jacobian_logdet(lambda t, xi=xi: fn(t, xi), ui.unsqueeze(0))[0] for ui, xi in zip(u, x)]
    )


# levels, alpha: D log L and D log(1 - 2 alpha) differ, and L - 1 would change the answer
@pytest.mark.parametrize("levels, alpha", [(5, 0.05), (17, 1e-3), (256, 0.2)])
def test_dequantize_then_logit_equals_the_jacobian_of_the_map_in_the_noise(levels, alpha):
    torch.manual_seed(1)
    shape = (3, 2, 1, 3)  # D = 6, non-square
    x = torch.randint(0, levels, shape).double()
    u = torch.rand(shape, dtype=torch.float64) * 0.9 + 0.05
    log_q = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)  # any noise density
    chain = Sequential(_FixedNoise(levels, u, log_q), LogitTransform(alpha))
    z, logdet = chain(x)

    def by_hand(ui: Tensor, xi: Tensor) -> Tensor:  # the published map, written out
        s = alpha + (1 - 2 * alpha) * (xi + ui) / levels
        return torch.log(s / (1 - s))

    torch.testing.assert_close(z, by_hand(u, x), rtol=1e-12, atol=1e-12)
    brute = _noise_jacobian_logdet(by_hand, u, x)
    # log p(x) bound = log p_z + log|dz/du| - log q(u): the chain's logdet is the last two
    torch.testing.assert_close(logdet, brute - log_q, rtol=1e-10, atol=1e-10)
    # and its parts: -D log L alone, not compensated by the logit's D log(1 - 2 alpha)
    deq_logdet = chain.layers[0](x)[1]
    torch.testing.assert_close(deq_logdet, -6 * math.log(levels) - log_q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [1e-4, 0.05, 0.3])
def test_logit_logdet_at_points_near_one_edge(alpha):
    """Points near 0 only (no symmetry s <-> 1 - s to hide a swapped term)."""
    y = torch.tensor([[0.01, 0.03, 0.2], [0.002, 0.4, 0.07]], dtype=torch.float64)
    layer = LogitTransform(alpha)
    _, logdet = layer(y)
    s = alpha + (1 - 2 * alpha) * y
    by_hand = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log(1 - s)).sum(1)
    torch.testing.assert_close(logdet, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.inverse(layer(y)[0]), y, rtol=1e-10, atol=1e-12)


def test_normalize_logdet_with_scales_whose_product_is_not_one():
    mean, std = (0.5, 0.1, -0.3), (2.0, 0.25, 0.7)  # log-sum -0.357, not 0
    layer = Normalize(mean, std).double()
    y = torch.rand(2, 3, 2, 5, dtype=torch.float64)  # H x W = 10 positions, C = 3
    z, logdet = layer(y)
    expected = -10 * sum(math.log(s) for s in std)
    torch.testing.assert_close(logdet, torch.full((2,), expected, dtype=torch.float64))
    brute = _jacobian_logdet(lambda t: layer(t.unsqueeze(0))[0][0], y)
    torch.testing.assert_close(logdet, brute, rtol=1e-10, atol=1e-10)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(z, (y - m) / s)


def test_dequantize_then_normalize_chain():
    """Glow's / DenseFlow's ``x / L - 1/2`` range: the chain's logdet is -D log L plus
    the normalization's -HW sum log std, each with its own sign."""
    torch.manual_seed(2)
    levels, mean, std = 7, (0.5, 0.5), (1.0, 0.4)
    x = torch.randint(0, levels, (2, 2, 3, 1)).double()
    u = torch.rand(2, 2, 3, 1, dtype=torch.float64)
    log_q = torch.zeros(2, dtype=torch.float64)
    chain = Sequential(_FixedNoise(levels, u, log_q), Normalize(mean, std).double())
    z, logdet = chain(x)
    s = torch.tensor(std, dtype=torch.float64).view(1, 2, 1, 1)
    torch.testing.assert_close(z, ((x + u) / levels - 0.5) / s)
    expected = -6 * math.log(levels) - 3 * math.log(0.4)
    torch.testing.assert_close(logdet, torch.full((2,), expected, dtype=torch.float64))


def test_image_preprocessing_logdet_is_a_density_of_the_noise():
    """With the real uniform dequantizer: ``exp(log p)`` of a uniform-in-logit-space
    model, integrated over the noise of one bin, is ``P(x)``; here checked pointwise:
    the chain's logdet equals the Jacobian of ``u -> z`` for the noise it drew."""
    torch.manual_seed(3)
    levels, alpha = 9, 0.1
    chain = Sequential(image_preprocessing(levels, alpha))
    chain.double()
    x = torch.randint(0, levels, (4, 1, 2, 2)).double()
    z, logdet = chain(x)
    s = torch.sigmoid(z)
    u = ((s - alpha) / (1 - 2 * alpha)) * levels - x  # the noise that was drawn
    assert ((u >= 0) & (u < 1)).all()

    def by_hand(t: Tensor, xi: Tensor) -> Tensor:
        p = alpha + (1 - 2 * alpha) * (xi + t) / levels
        return torch.log(p) - torch.log1p(-p)

    brute = _noise_jacobian_logdet(by_hand, u, x)
    torch.testing.assert_close(logdet, brute, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("base", ["normal", "logistic"])
def test_variational_base_density_is_the_distributions_density(base):
    deq = VariationalDequantizer(5, Sequential(), base=base).double()
    x = torch.randint(0, 5, (6, 1, 2, 3)).double()
    eps, log_base = deq.sample_base(x)
    ref = (
        torch.distributions.Normal(0.0, 1.0)
        if base == "normal"
        else torch.distributions.TransformedDistribution(
            torch.distributions.Uniform(0.0, 1.0),
            [torch.distributions.SigmoidTransform().inv],
        )
    )
    expected = ref.log_prob(eps).flatten(1).sum(1)
    torch.testing.assert_close(log_base, expected, rtol=1e-10, atol=1e-10)


def test_variational_noise_of_an_affine_flow_has_the_analytic_density():
    """``u = sigmoid(a eps + b)``, ``eps ~ N(0, 1)``: ``q(u) = N(logit u; b, a^2) /
    (u (1 - u))`` per element, so ``log q`` is known in closed form."""
    from resflow.layers.actnorm import ElementActNorm

    flow = ElementActNorm((1, 2, 2))
    deq = VariationalDequantizer(4, Sequential(flow), base="normal").double()
    with torch.no_grad():
        deq(torch.zeros(8, 1, 2, 2, dtype=torch.float64))  # initialise, then set by hand
        for p in flow.parameters():
            p.copy_(torch.linspace(-0.7, 0.9, p.numel(), dtype=torch.float64).view_as(p))
    x = torch.randint(0, 4, (5, 1, 2, 2)).double()
    torch.manual_seed(4)
    u, log_q = deq.noise(x)
    h = torch.log(u) - torch.log1p(-u)
    # the flow's elementwise affine map h = a eps + b, read off at eps = 0 and eps = 1
    ones = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    b, _ = flow(0 * ones)
    a = flow(ones)[0] - b
    normal = torch.distributions.Normal(b, a.abs())
    expected = (normal.log_prob(h) - torch.log(u) - torch.log1p(-u)).flatten(1).sum(1)
    torch.testing.assert_close(log_q, expected, rtol=1e-8, atol=1e-8)


def test_gaussian_noise_is_drawn_in_evaluation_too():
    """The noisy model is scored on noisy data: the noise is there in eval mode."""
    layer = GaussianNoise(0.2).eval()
    x = torch.full((20_000, 2), 0.3)
    y, logdet = layer(x)
    assert float((y - x).std()) == pytest.approx(0.2, rel=0.03)
    assert abs(float((y - x).mean())) < 0.01 and (logdet == 0).all()


def test_reduced_bits_decode_to_the_centre_of_their_8_bit_bin():
    """Level ``j`` of ``b`` bits is the 8-bit bin ``[j s, j s + s - 1]``, ``s = 2^(8-b)``."""
    from resflow.preprocess import ReduceBits, reduce_bits

    for bits in (3, 5, 7):
        s = 2 ** (8 - bits)
        layer = ReduceBits(bits)
        y = torch.arange(2**bits)
        x = layer.inverse(y)
        assert torch.equal(reduce_bits(x, bits), y)
        assert (((x - y * s) - (s - 1) / 2).abs() <= 0.5).all()


def test_quantized_noise_is_a_density_of_the_noisy_levels():
    """TarFlow's official mode: ``y = x / (L - 1) + std eps`` from the levels, and the
    logdet of the map from the noisy levels ``v = (L - 1) y`` to ``y`` (so ``L - 1``,
    not ``L``), its inverse the negative."""
    from resflow.preprocess.noise import QuantizedGaussianNoise

    levels, std = 9, 0.03
    layer = QuantizedGaussianNoise(levels, std).double().eval()
    x = torch.tensor([0.0, 3.0, 8.0, 5.0], dtype=torch.float64).repeat(5000, 1)
    y, logdet = layer(x)
    err = y - x / (levels - 1)
    assert float(err.mean().abs()) < 1e-3
    assert float(err.std()) == pytest.approx(std, rel=0.02)
    v = y[:3] * (levels - 1)
    brute = _jacobian_logdet(lambda t: t / (levels - 1), v)
    torch.testing.assert_close(logdet[:3], brute, rtol=1e-12, atol=1e-12)
    assert float(logdet[0]) == pytest.approx(-4 * math.log(levels - 1))
    back, inverse_logdet = layer.inverse_and_logdet(x / (levels - 1))  # noise-free
    assert torch.equal(back, x)
    torch.testing.assert_close(inverse_logdet, -logdet)
