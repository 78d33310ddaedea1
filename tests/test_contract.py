"""One contract test over every layer and model: round trip, logdet against the
brute-force Jacobian, gradients reaching every parameter, dtype moves, state_dict."""

from __future__ import annotations

import io

import pytest
import torch

from resflow.layers import EXACT_ESTIMATOR, ActNorm, ResidualBlock, Sequential
from resflow.layers.base import Inverse
from resflow.layers.elementwise import LogitTransform, Normalize
from resflow.layers.multiscale import FactorOut, Flatten
from resflow.layers.squeeze import Squeeze
from resflow.models.presets import get_preset
from resflow.models.residual_flow import EstimatorConfig, build_model
from resflow.nets import residual_cnn, residual_mlp

from helpers import brute_logdet


def _res_vec() -> ResidualBlock:
    return ResidualBlock(residual_mlp(3, (8, 8)), EXACT_ESTIMATOR, EXACT_ESTIMATOR)


def _res_img() -> ResidualBlock:
    return ResidualBlock(residual_cnn(2, 8), EXACT_ESTIMATOR, EXACT_ESTIMATOR)


def _factor() -> FactorOut:
    inner = Sequential(ActNorm(2), Flatten((2, 2, 2)))
    return FactorOut(inner, (4, 2, 2), learned_prior=True)


LAYERS = {
    "actnorm-vec": (lambda: ActNorm(3), (3,)),
    "actnorm-img": (lambda: ActNorm(2), (2, 4, 4)),
    "residual-vec": (_res_vec, (3,)),
    "residual-img": (_res_img, (2, 4, 4)),
    "logit": (lambda: LogitTransform(0.05), (2, 2, 2)),
    "normalize": (lambda: Normalize((0.5, 0.2), (2.0, 0.5)), (2, 2, 2)),
    "squeeze": (lambda: Squeeze(2), (1, 4, 4)),
    "flatten": (lambda: Flatten((2, 2, 2)), (2, 2, 2)),
    "factor-out": (_factor, (4, 2, 2)),
    "sequential": (lambda: Sequential(ActNorm(3), _res_vec(), ActNorm(3)), (3,)),
    "inverse-of-actnorm": (lambda: Inverse(ActNorm(3)), (3,)),
}


def _input(name: str, shape: tuple[int, ...], n: int = 4) -> torch.Tensor:
    if name == "logit":
        return torch.rand(n, *shape) * 0.9 + 0.05
    return torch.randn(n, *shape)


@pytest.fixture(params=sorted(LAYERS))
def case(request):
    make, shape = LAYERS[request.param]
    layer = make()
    x = _input(request.param, shape)
    layer(x)  # data-dependent initialisation, lazy buffers
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return request.param, layer, x


def test_round_trip(case):
    _, layer, x = case
    y, _ = layer(x)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-5, rtol=1e-5)


def test_logdet_matches_brute_force_jacobian(case):
    _, layer, x = case
    x = x.double()
    layer = layer.double()
    _, logdet = layer(x)
    torch.testing.assert_close(logdet, brute_logdet(layer, x), atol=1e-6, rtol=1e-6)


def test_gradients_reach_every_parameter(case):
    name, layer, x = case
    x.requires_grad_(True)
    y, logdet = layer(x)
    (y.pow(2).sum() - logdet.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"


def test_state_dict_round_trip(case):
    name, layer, x = case
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = LAYERS[name][0]()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x)[0], layer(x)[0])


def test_dtype_move(case):
    _, layer, x = case
    y64, ld64 = layer.double()(x.double())
    assert y64.dtype == torch.float64 and ld64.dtype == torch.float64


MODELS = {
    "vector": lambda: build_model(get_preset("toy2d", n_blocks=2, hidden=(16,), dim=2)),
    "image": lambda: build_model(
        get_preset(
            "digits-small",
            image_shape=(1, 4, 4),
            n_blocks=(1, 1),
            hidden=8,
            fc_blocks=1,
            fc_hidden=(8,),
            estimator=EstimatorConfig(train_method="exact", eval_method="exact"),
        )
    ),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_log_prob_and_sampling(kind):
    model = MODELS[kind]()
    if kind == "image":
        x = torch.randint(0, 17, (6, 1, 4, 4))
    else:
        x = torch.randn(6, 2)
    logp = model.log_prob(x)
    assert logp.shape == (6,) and torch.isfinite(logp).all()
    model.eval()
    s = model.sample(3, temperature=0.7)
    assert s.shape == (3, *model.shape)
    if kind == "image":  # dequantize -> model -> inverse recovers the integer image
        with torch.no_grad():
            z, _ = model(x)
        torch.testing.assert_close(model.inverse(z), x.float())


def test_model_rejects_bad_input():
    model = MODELS["vector"]()
    with pytest.raises(ValueError, match=r"expected data of shape \[B, 2\]"):
        model.log_prob(torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        model.log_prob(torch.tensor([[0.0, float("nan")]]))
