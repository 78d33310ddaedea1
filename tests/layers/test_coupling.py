from functools import partial

import pytest
import torch
from torch import nn

from resflow.layers.coupling import AlternateMask, ChannelMask, CheckerboardMask, Coupling
from resflow.layers.transformers import Additive, Affine
from resflow.nets.conditioners import MLP, ConvNet

from helpers import brute_logdet

TRANSFORMERS = {
    "affine-exp": lambda: Affine("exp"),
    "affine-sigmoid": lambda: Affine("sigmoid"),
    "affine-softplus": lambda: Affine("softplus"),
    "additive": Additive,
}
VECTOR_MASKS = {
    "channel": ChannelMask(),
    "channel-reversed": ChannelMask(reverse=True),
    "alternate": AlternateMask(),
    "alternate-reversed": AlternateMask(reverse=True),
}
IMAGE_MASKS = {
    "channel": ChannelMask(),
    "channel-reversed": ChannelMask(reverse=True),
    "alternate": AlternateMask(),
    "checkerboard": CheckerboardMask(),
    "checkerboard-reversed": CheckerboardMask(reverse=True),
}
# name -> (masks, example shape, context example shape or None)
SETUPS = {
    "vec": (VECTOR_MASKS, (5,), None),
    "vec-context": (VECTOR_MASKS, (5,), (3,)),
    "img": (IMAGE_MASKS, (3, 4, 4), None),
    "img-vector-context": (IMAGE_MASKS, (3, 4, 4), (2,)),
    "img-image-context": (IMAGE_MASKS, (3, 4, 4), (1, 4, 4)),
}
CASES = [
    (setup, mask, t)
    for setup, (masks, _, _) in SETUPS.items()
    for mask in masks
    for t in TRANSFORMERS
    if not (setup.endswith("context") and mask.endswith("reversed"))
]


def _build(setup: str, mask: str, transformer: str, zero_init: bool = False):  # type: ignore[no-untyped-def]
    masks, shape, ctx_shape = SETUPS[setup]
    k = 0 if ctx_shape is None else ctx_shape[0]
    if len(shape) == 1:
        net = partial(MLP, hidden=(16,), activation="tanh", context_features=k, zero_init=zero_init)
    else:
        net = partial(ConvNet, hidden=8, activation="tanh", context_channels=k, zero_init=zero_init)
    layer = Coupling.build(shape, masks[mask], TRANSFORMERS[transformer](), net).double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    ctx = None if ctx_shape is None else torch.randn(3, *ctx_shape, dtype=torch.float64)
    return layer, x, ctx


def _brute(layer, x, ctx):  # type: ignore[no-untyped-def]
    if ctx is None:
        return brute_logdet(layer, x)
    rows = [
        brute_logdet(lambda t, c=ctx[i : i + 1]: layer(t, c), x[i : i + 1]) for i in range(len(x))
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("setup,mask,transformer", CASES)
def test_round_trip_logdet_and_inverse_logdet(setup, mask, transformer):
    layer, x, ctx = _build(setup, mask, transformer)
    y, logdet = layer(x, ctx)
    assert y.shape == x.shape and logdet.shape == (3,)
    assert not torch.allclose(y, x)  # the layer does something
    torch.testing.assert_close(layer.inverse(y, ctx), x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logdet, _brute(layer, x, ctx), atol=1e-10, rtol=1e-10)
    x_rec, logdet_inv = layer.inverse_and_logdet(y, ctx)
    torch.testing.assert_close(x_rec, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-10, rtol=1e-10)
    assert layer.output_shape(tuple(x.shape[1:])) == tuple(x.shape[1:])


@pytest.mark.parametrize("setup,mask,transformer", CASES)
def test_conditioning_part_passes_unchanged(setup, mask, transformer):
    layer, x, ctx = _build(setup, mask, transformer)
    y, _ = layer(x, ctx)
    keep = layer.mask.split(x)[0]
    if isinstance(layer.mask, CheckerboardMask):
        m = layer.mask.mask(x).expand_as(x)
        assert torch.equal(y[m], x[m]) and not torch.allclose(y[~m], x[~m])
    else:
        assert torch.equal(layer.mask.split(y)[0], keep)


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("transformer", sorted(TRANSFORMERS))
def test_gradients_reach_every_parameter(setup, transformer):
    mask = "checkerboard" if setup.startswith("img") else "channel"
    layer, x, ctx = _build(setup, mask, transformer)
    y, logdet = layer(x, ctx)
    (y.pow(2).sum() - logdet.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("transformer", ["affine-exp", "additive"])
def test_zero_initialised_conditioner_is_identity(setup, transformer):
    mask = "checkerboard" if setup.startswith("img") else "alternate"
    layer, x, ctx = _build(setup, mask, transformer, zero_init=True)
    y, logdet = layer(x, ctx)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3, dtype=torch.float64))


def test_checkerboard_pattern():
    x = torch.zeros(1, 1, 2, 3)
    m = CheckerboardMask().mask(x)[0, 0]
    assert m.tolist() == [[True, False, True], [False, True, False]]  # (h + w) even
    assert torch.equal(CheckerboardMask(reverse=True).mask(x)[0, 0], ~m)


def test_channel_mask_odd_sizes_and_alternate_split():
    x = torch.arange(5.0).view(1, 5)
    assert ChannelMask().channels((5,)) == (2, 3)
    assert ChannelMask(reverse=True).channels((5,)) == (3, 2)
    a, b = ChannelMask(reverse=True).split(x)
    assert a.tolist() == [[2.0, 3.0, 4.0]] and b.tolist() == [[0.0, 1.0]]
    assert torch.equal(
        ChannelMask(reverse=True).merge(x, b + 10), torch.tensor([[10, 11, 2, 3, 4.0]])
    )
    a, b = AlternateMask().split(x)
    assert a.tolist() == [[0.0, 2.0, 4.0]] and b.tolist() == [[1.0, 3.0]]
    assert torch.equal(AlternateMask().merge(x, b + 10), torch.tensor([[0, 11, 2, 13, 4.0]]))
    assert AlternateMask(reverse=True).channels((5,)) == (2, 3)


def test_clear_errors():
    with pytest.raises(ValueError, match="CheckerboardMask needs images"):
        Coupling.build((4,), CheckerboardMask(), Affine(), MLP)
    layer = Coupling(CheckerboardMask(), ConvNet(2, 4), Affine())
    with pytest.raises(ValueError, match="CheckerboardMask needs images"):
        layer(torch.randn(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        Coupling.build((1,), ChannelMask(), Affine(), MLP)
    wrong = Coupling(ChannelMask(), MLP(2, 3), Affine())  # needs 2 x 2 = 4 outputs
    with pytest.raises(ValueError, match=r"conditioner returned shape \(5, 3\), expected \(5, 4\)"):
        wrong(torch.randn(5, 4))
    conditional = Coupling.build((4,), ChannelMask(), Affine(), partial(MLP, context_features=2))
    with pytest.raises(ValueError, match="expects a context with 2 features, got none"):
        conditional(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"expects a context of shape \[B, 2\]"):
        conditional(torch.randn(5, 4), torch.randn(5, 3))
    conv = Coupling.build(
        (2, 4, 4), CheckerboardMask(), Affine(), partial(ConvNet, context_channels=1)
    )
    with pytest.raises(ValueError, match=r"\[B, 1\] or \[B, 1, 4, 4\]"):
        conv(torch.randn(5, 2, 4, 4), torch.randn(5, 1, 3, 3))


def test_plain_module_conditioner_and_unconditional_nets_ignore_context():
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4))
    layer = Coupling(ChannelMask(), net, Affine())
    x = torch.randn(6, 4)
    y, _ = layer(x)
    torch.testing.assert_close(layer.inverse(y), x)
    ld = Coupling.build((4,), ChannelMask(), Affine(), partial(MLP, zero_init=False))
    torch.testing.assert_close(ld(x, torch.randn(6, 7))[0], ld(x)[0])
