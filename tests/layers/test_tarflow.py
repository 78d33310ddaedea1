"""TarFlow's parts: the patch layer, the causal transformer and its key/value cache,
the block's autoregressive Jacobian in either token order, cached against uncached
inversion, classifier-free guidance and label dropout."""

from __future__ import annotations

import pytest
import torch

from resflow.layers.base import FlowLayer, zero_logdet
from resflow.layers.guidance import ContextDropout, guidance
from resflow.layers.patch import Patchify
from resflow.layers.tarflow import TarFlowBlock, without_cache
from resflow.nets.transformer import CausalTransformer

T, D = 5, 3


def _net(context: int = 0, zero_init: bool = False) -> CausalTransformer:
    return CausalTransformer(D, 2 * D, tokens=T, width=16, depth=2, heads=2,
                             context_features=context, zero_init=zero_init)  # fmt: skip


def _block(flip: bool = False, context: int = 0) -> TarFlowBlock:
    torch.manual_seed(0)
    return TarFlowBlock(_net(context), flip=flip).double()


def test_patchify_reads_patches_in_raster_order_on_non_square_images():
    layer = Patchify((2, 4, 6), 2)
    x = torch.randn(3, 2, 4, 6)
    y, logdet = layer(x)
    assert y.shape == (3, 6, 8) and layer.output_shape((2, 4, 6)) == (6, 8)
    # token 4 = patch row 1, column 1; features: channel-major, then the 2x2 pixels
    torch.testing.assert_close(y[:, 4], x[:, :, 2:4, 2:4].reshape(3, 8), rtol=0, atol=0)
    torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=0)
    assert torch.equal(logdet, torch.zeros(3))
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        Patchify((1, 6, 8), 4)


@pytest.mark.parametrize("grad", [False, True])
def test_cached_steps_equal_the_full_pass(grad):
    """Preallocated buffers without autograd, concatenation with it."""
    torch.manual_seed(0)
    net = _net(context=3)
    x, ctx = torch.randn(4, T, D), torch.eye(3)[[0, 1, 2, 0]]
    cache = net.new_cache()
    with torch.set_grad_enabled(grad):
        steps = torch.stack([net.step(x[:, max(t - 1, 0)], cache, ctx) for t in range(T)], 1)
    torch.testing.assert_close(steps, net(x, ctx), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="all 5 positions are computed"):
        net.step(x[:, 0], cache, ctx)


def test_the_network_is_strictly_causal():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(2, T, D)
    out = net(x)
    for t in range(T):
        changed = x.clone()
        changed[:, t:] += 1.0  # token t and later
        other = net(changed)
        torch.testing.assert_close(other[:, : t + 1], out[:, : t + 1])  # output t sees x_<t
        if t + 1 < T:
            assert not torch.allclose(other[:, t + 1], out[:, t + 1])


def test_a_zero_initialised_block_is_the_identity():
    block = TarFlowBlock(_net(zero_init=True))
    x = torch.randn(3, T, D)
    z, logdet = block(x)
    torch.testing.assert_close(z, x, rtol=0, atol=0)
    assert torch.equal(logdet, torch.zeros(3))


@pytest.mark.parametrize("flip", [False, True])
def test_jacobian_is_block_triangular_in_the_blocks_token_order(flip):
    block = _block(flip)
    x = torch.randn(1, T, D, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: block(t)[0], x)[0, :, :, 0]  # [T,D,T,D]
    blocks = jac.abs().sum((1, 3))  # |d z_t / d x_s| summed over features
    later = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)  # s > t
    zero, full = (later.T, later) if flip else (later, later.T)  # flipped: z_t sees x_>=t
    assert float(blocks[zero].max()) == 0.0
    assert bool((blocks[full] > 1e-6).all())  # every allowed dependence is there
    for t in range(T):  # diagonal blocks: diag(exp(-alpha_t))
        diag = jac[t, :, t, :]
        torch.testing.assert_close(diag, torch.diag(torch.diagonal(diag)))
    brute = torch.linalg.slogdet(jac.reshape(T * D, T * D))[1]
    torch.testing.assert_close(block(x)[1][0], brute)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("weight", [None, 2.5])
def test_cached_inverse_equals_the_uncached_inverse(flip, weight):
    torch.manual_seed(1)
    block = TarFlowBlock(_net(context=3), flip=flip)
    block.guidance = weight
    z, ctx = torch.randn(6, T, D), torch.eye(3)[torch.arange(6) % 3]
    with torch.no_grad():
        cached, ld_cached = block.inverse_and_logdet(z, ctx)
    uncached, ld_uncached = block.inverse_uncached(z, ctx)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld_cached, ld_uncached, atol=1e-5, rtol=1e-5)
    with without_cache(block):
        torch.testing.assert_close(block.inverse(z, ctx), uncached)
    assert block.use_cache
    torch.testing.assert_close(block(cached, ctx)[0], z, atol=1e-5, rtol=1e-5)


def test_guidance_zero_is_the_null_class_and_one_the_conditional_model():
    block = _block(context=3)
    x = torch.randn(4, T, D, dtype=torch.float64)
    ctx = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 1]]
    cond, null = block.params(x, ctx), block.params(x, torch.zeros_like(ctx))
    assert not torch.allclose(cond[1], null[1])  # the label matters
    for w, expected in ((0.0, null), (1.0, cond)):
        with guidance(block, w):
            for got, want in zip(block.params(x, ctx), expected):
                torch.testing.assert_close(got, want)
    with guidance(block, 3.0):
        alpha, mu = block.params(x, ctx)
    torch.testing.assert_close(mu, null[1] + 3.0 * (cond[1] - null[1]))
    torch.testing.assert_close(alpha, null[0] + 3.0 * (cond[0] - null[0]))
    assert block.guidance is None  # restored
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        with guidance(torch.nn.Linear(2, 2), 1.0):
            pass


class _Record(FlowLayer):
    """Records the contexts it sees (two of them stand for two blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, context=None):
        self.seen.append(context)
        return x, zero_logdet(x)


def test_label_dropout_drops_whole_labels_for_every_wrapped_layer():
    from resflow.layers.base import Sequential

    a, b = _Record(), _Record()
    layer = ContextDropout(Sequential(a, b), p=0.3)
    ctx = torch.eye(4)[torch.arange(4000) % 4]
    layer(torch.zeros(4000, 1), ctx)
    seen = a.seen[-1]
    assert torch.equal(seen, b.seen[-1])  # one draw for all the layers
    dropped = seen.sum(1) == 0
    assert 0.27 < float(dropped.float().mean()) < 0.33
    torch.testing.assert_close(seen[~dropped], ctx[~dropped], rtol=0, atol=0)
    layer.eval()
    layer(torch.zeros(4000, 1), ctx)
    assert torch.equal(a.seen[-1], ctx)
