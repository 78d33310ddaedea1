import pytest
import torch

from resflow.layers import LipSwish, make_activation


@pytest.mark.parametrize("beta", [1e-3, 0.1, 0.5, 1.0, 5.0, 100.0])
def test_lipswish_derivative_at_most_one(beta):
    act = LipSwish(beta)
    z = torch.linspace(-30, 30, 20001, requires_grad=True)
    (d,) = torch.autograd.grad(act(z).sum(), z)
    assert d.abs().max() <= 1.0
    assert d.abs().max() > 0.4  # not trivially small


def test_lipswish_formula_and_init():
    act = LipSwish()
    beta = float(torch.nn.functional.softplus(torch.tensor(0.5)))  # the authors' init
    assert float(act.beta.detach()) == pytest.approx(beta)
    z = torch.randn(10)
    torch.testing.assert_close(act(z), z * torch.sigmoid(beta * z) / 1.1)
    assert float(LipSwish(2.0).beta.detach()) == pytest.approx(2.0)
    assert act.b.requires_grad


def test_activation_registry():
    assert isinstance(make_activation("ELU"), torch.nn.ELU)
    assert isinstance(make_activation("softplus"), torch.nn.Softplus)
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        make_activation("relu6")
