import io

import pytest
import torch
from torch import nn

from resflow.layers.autoregressive import Autoregressive
from resflow.layers.base import Sequential
from resflow.layers.permutation import Permutation, Reverse
from resflow.layers.sigmoidal import DDSF, DSF
from resflow.layers.transformers import Additive, Affine
from resflow.nets.made import MADE

from helpers import brute_logdet

TRANSFORMERS = {
    "affine-exp": lambda: Affine("exp"),
    "affine-sigmoid": lambda: Affine("sigmoid"),
    "affine-softplus": lambda: Affine("softplus"),
    "additive": Additive,
    "dsf": lambda: DSF(4),
    "ddsf": lambda: DDSF(4, 2),
}
ORDERS = ["natural", "reversed", "random"]
D = 5


def _build(transformer: str, order: str, context: int = 0, zero_init: bool = False):  # type: ignore[no-untyped-def]
    t = TRANSFORMERS[transformer]()
    made = MADE(
        D,
        (16, 16),
        t.n_params,
        order=order,
        seed=7,
        context_features=context,
        activation="tanh",
        zero_init=zero_init,
    )
    layer = Autoregressive(made, t).double()
    x = torch.randn(3, D, dtype=torch.float64)
    ctx = torch.randn(3, context, dtype=torch.float64) if context else None
    return layer, x, ctx


def _jacobian(layer, x, ctx):  # type: ignore[no-untyped-def]
    """Dense ``dy/dx`` per sample, ``[B, D, D]``."""
    rows = []
    for i in range(len(x)):
        c = None if ctx is None else ctx[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda t, c=c: layer(t[None], c)[0][0], x[i])
        rows.append(jac)
    return torch.stack(rows)


CASES = [(t, o, c) for t in TRANSFORMERS for o in ORDERS for c in (0, 2)]


@pytest.mark.parametrize("transformer,order,context", CASES)
def test_round_trip_logdet_and_triangular_jacobian(transformer, order, context):
    layer, x, ctx = _build(transformer, order, context)
    y, logdet = layer(x, ctx)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(layer.inverse(y, ctx), x, atol=1e-10, rtol=1e-10)
    x_rec, logdet_inv = layer.inverse_and_logdet(y, ctx)
    torch.testing.assert_close(x_rec, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-10, rtol=1e-10)

    jac = _jacobian(layer, x, ctx)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac)[1], atol=1e-10, rtol=1e-10)
    if ctx is None:
        torch.testing.assert_close(logdet, brute_logdet(layer, x), atol=1e-10, rtol=1e-10)
    perm = layer.conditioner.order
    in_order = jac[:, perm][:, :, perm]  # rows and columns in the autoregressive order
    strict_upper = torch.triu(torch.ones(D, D, dtype=torch.bool), 1)
    assert in_order[:, strict_upper].abs().max() == 0
    lower = torch.tril(torch.ones(D, D, dtype=torch.bool), -1)
    assert (in_order[:, lower].abs() > 0).all()  # and every earlier dimension matters


def test_orders_are_what_they_say():
    assert MADE(4, (8,), order="natural").order.tolist() == [0, 1, 2, 3]
    assert MADE(4, (8,), order="reversed").order.tolist() == [3, 2, 1, 0]
    a, b = MADE(6, (8,), order="random", seed=1), MADE(6, (8,), order="random", seed=1)
    assert torch.equal(a.order, b.order) and sorted(a.order.tolist()) == list(range(6))


@pytest.mark.parametrize("transformer", ["affine-exp", "additive"])
@pytest.mark.parametrize("context", [0, 2])
def test_zero_initialised_made_is_identity(transformer, context):
    layer, x, ctx = _build(transformer, "random", context, zero_init=True)
    y, logdet = layer(x, ctx)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("context", [0, 2])
def test_gradients_reach_every_parameter(context):
    layer, x, ctx = _build("affine-softplus", "random", context)
    y, logdet = layer(x, ctx)
    (y.pow(2).sum() - logdet.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sampling_direction_is_differentiable():
    layer, x, _ = _build("affine-exp", "reversed")
    y = x.clone().requires_grad_(True)
    x_rec, logdet_inv = layer.inverse_and_logdet(y)
    (x_rec.sum() + logdet_inv.sum()).backward()
    assert y.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_explicit_order_overrides_conditioner():
    made = MADE(3, (8,), order="reversed", zero_init=False).double()
    layer = Autoregressive(made, Affine(), order=[2, 1, 0])
    assert layer.order.tolist() == [2, 1, 0]
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(layer.inverse(layer(x)[0]), x)
    wrong = Autoregressive(made, Affine(), order=[0, 1, 2])  # not the conditioner's order
    assert not torch.allclose(wrong.inverse(layer(x)[0]), x)


def test_clear_errors():
    layer = Autoregressive(nn.Linear(3, 5), Affine())
    with pytest.raises(ValueError, match=r"conditioner returned shape \(2, 5\)"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="vectors"):
        Autoregressive(MADE(3), Affine())(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match="expects a context with 2 features"):
        Autoregressive(MADE(3, context_features=2), Affine())(torch.randn(2, 3))


def test_permutation_layers():
    x = torch.randn(4, 5)
    p = Permutation.random(5, seed=2)
    y, logdet = p(x)
    assert torch.equal(y, x[:, p.perm]) and torch.equal(logdet, torch.zeros(4))
    assert torch.equal(p.inverse(y), x)
    x_rec, ld = p.inverse_and_logdet(y)
    assert torch.equal(x_rec, x) and torch.equal(ld, torch.zeros(4))
    img = torch.randn(2, 3, 2, 2)
    assert torch.equal(Reverse(3)(img)[0], img.flip(1))
    with pytest.raises(ValueError, match="permutation of 0..2"):
        Permutation([0, 0, 2])
    with pytest.raises(ValueError, match=r"Reverse\(3\) expects"):
        Reverse(3)(x)
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    q = Permutation.random(5, seed=3)
    q.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(q(x)[0], y)


def test_maf_stack_round_trip():
    """MAF: autoregressive layers alternating with reversals."""
    layers = []
    for _ in range(3):
        layers += [Autoregressive(MADE(D, (16,), zero_init=False), Affine()), Reverse(D)]
    flow = Sequential(layers).double()
    x = torch.randn(4, D, dtype=torch.float64)
    y, logdet = flow(x)
    torch.testing.assert_close(flow.inverse(y), x)
    torch.testing.assert_close(logdet, brute_logdet(flow, x))
