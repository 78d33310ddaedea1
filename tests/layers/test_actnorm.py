import pytest
import torch

from resflow.layers import ActNorm


@pytest.mark.parametrize("shape", [(64, 5), (16, 3, 4, 4)])
def test_init_gives_zero_mean_unit_variance(shape):
    x = torch.randn(shape) * 3 + 2
    layer = ActNorm(shape[1])
    y, logdet = layer(x)
    dims = [0] + list(range(2, len(shape)))
    torch.testing.assert_close(y.mean(dims), torch.zeros(shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dims, unbiased=False), torch.ones(shape[1]), atol=1e-4, rtol=0)
    assert logdet.shape == (shape[0],)


def test_init_not_repeated_after_loading_checkpoint():
    a = ActNorm(3)
    a(torch.randn(10, 3) * 5)
    b = ActNorm(3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 3)
    torch.testing.assert_close(b(x)[0], a(x)[0])  # b did not re-initialise on x


def test_wrong_channels():
    with pytest.raises(ValueError, match=r"ActNorm\(3\) expects"):
        ActNorm(3)(torch.randn(2, 4))
