import pytest
import torch

from resflow.layers import InverseNotConvergedError, LipschitzLinear, ResidualBlock
from resflow.nets import residual_cnn, residual_mlp

from helpers import strong_block


@pytest.mark.parametrize("d", [2, 10])
def test_round_trip_near_the_lipschitz_limit(d):
    block = strong_block(d, seed=0, coeff=0.98)
    x = torch.randn(64, d) * 2
    y, _ = block(x)
    assert (block.inverse(y) - x).abs().max() < 1e-5


def test_image_block_round_trip():
    block = ResidualBlock(residual_cnn(3, 16, coeff=0.98))
    with torch.no_grad():
        for m in block.g.modules():
            if hasattr(m, "weight") and m.weight.dim() == 4:
                m.weight.mul_(20)
    x = torch.randn(4, 3, 6, 6)
    block(x)
    from resflow.layers import refresh_lipschitz

    refresh_lipschitz(block, atol=1e-6, rtol=1e-6, max_iter=2000)
    y, _ = block(x)
    assert (block.inverse(y) - x).abs().max() < 1e-5


def test_inverse_raises_when_it_does_not_converge():
    g = residual_mlp(2, (8,), coeff=3.0, preact=False)  # not a contraction
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, LipschitzLinear):
                m.weight.copy_(torch.eye(2, m.weight.shape[1]) * 3 if m.weight.shape[0] == 2
                               else torch.eye(m.weight.shape[0], 2) * 3)  # fmt: skip
    block = ResidualBlock(g, inverse_max_iter=50)
    with pytest.raises(InverseNotConvergedError, match="did not converge in 50 iterations"):
        block.inverse(torch.full((3, 2), 5.0))


def test_bad_roulette_parameters():
    with pytest.raises(ValueError, match="geom_p"):
        ResidualBlock(residual_mlp(2), geom_p=1.5)
    with pytest.raises(ValueError, match="poisson_lambda"):
        ResidualBlock(residual_mlp(2), poisson_lambda=0)


def test_inverse_gradients_are_the_implicit_ones():
    """d f^{-1}(y) / d(y, theta) equals autograd through an unrolled fixed point."""
    from helpers import strong_block

    block = strong_block(3, coeff=0.9).double()
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64)
    params = [p for p in block.g.parameters() if p.requires_grad]
    (block.inverse(y) * w).sum().backward()
    implicit = [y.grad.clone(), *[p.grad.clone() for p in params]]
    y.grad = None
    for p in params:
        p.grad = None
    x = y
    for _ in range(300):  # unrolled: ordinary autograd through every iteration
        x = y - block.g(x)
    (x * w).sum().backward()
    unrolled = [y.grad, *[p.grad for p in params]]
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_roulette_numbers_follow_the_parameters():
    """The cached Python copies of the roulette parameters follow in-place changes,
    reassignment and checkpoint loading (a stale value would bias nothing visibly)."""
    from resflow.layers import ResidualBlock
    from resflow.nets import residual_mlp

    block = ResidualBlock(residual_mlp(2, (8,), coeff=0.9), geom_p=0.5, poisson_lambda=2.0)
    assert block.roulette() == (0.5, 2.0)
    with torch.no_grad():
        block.poisson_lambda.fill_(3.0)
    assert block.roulette() == (0.5, 3.0)
    other = ResidualBlock(residual_mlp(2, (8,), coeff=0.9), geom_p=0.25, poisson_lambda=1.5)
    block.load_state_dict(other.state_dict())
    assert block.roulette() == (0.25, 1.5)
    block.geom_p = torch.nn.Parameter(torch.tensor(0.75), requires_grad=False)
    assert block.roulette() == (0.75, 1.5)
