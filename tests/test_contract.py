"""One contract test over every layer and every registered model.

Layers: round trip, logdet against the brute-force Jacobian, ``inverse_and_logdet``,
``output_shape`` against the real output, gradients reaching every parameter, dtype
moves, ``state_dict`` round trip -- always with a ``context`` tensor (conditional
layers use it, the others must accept and ignore it).
Models: every registered model has a tiny case here (a test checks it), with
log-densities, sampling, ``sample_and_log_prob`` and state dicts.
"""

from __future__ import annotations

import io
from functools import partial

import pytest
import torch

from layers.coupling_cases import CASES as COUPLING_CASES
from resflow.layers import EXACT_ESTIMATOR, ActNorm, ResidualBlock, Sequential
from resflow.layers.actnorm import ElementActNorm
from resflow.layers.autoregressive import Autoregressive
from resflow.layers.base import Inverse
from resflow.layers.batchnorm import BatchNormFlow
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import (
    AlternateMask,
    ChannelMask,
    CheckerboardMask,
    ColumnMask,
    Coupling,
)
from resflow.layers.guidance import ContextDropout
from resflow.layers.halves import Halves
from resflow.layers.logistic_mixture import LogisticMixtureCDF
from resflow.layers.multiscale import ConditionalPrior, DiagonalPrior, FactorOut, Flatten
from resflow.layers.patch import Patchify
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.layers.sigmoidal import DDSF, DSF
from resflow.layers.splines import RationalQuadraticSpline
from resflow.layers.squeeze import Squeeze
from resflow.layers.tarflow import TarFlowBlock
from resflow.layers.transformers import Additive, Affine
from resflow.models import MODELS, build_model, get_preset
from resflow.models.denseflow import DenseFlowConfig, SoftClampAffine, Unsqueeze
from resflow.models.dequantization import DequantizationConfig
from resflow.models.flowpp import FlowppConfig
from resflow.models.glow import GlowConfig, GlowTopPrior, GlowVectorConfig
from resflow.models.iresnet import IResNetConfig, IResNetVectorConfig
from resflow.models.naf import MAFConfig, NAFConfig
from resflow.models.nsf import NSFConfig
from resflow.models.nsf_image import NSFImageConfig
from resflow.models.realnvp import RealNVPConfig, RealNVPVectorConfig
from resflow.models.tarflow import TarFlowConfig
from resflow.nets import residual_cnn, residual_mlp
from resflow.nets.conditioners import ConvNet, ResidualMLP
from resflow.nets.denseflow import ContextDenseNet, DenseAttentionNet
from resflow.nets.flowpp import FlowppNet
from resflow.nets.glow import GlowNet
from resflow.nets.made import MADE
from resflow.nets.realnvp import RealNVPMLP, RealNVPResNet
from resflow.nets.transformer import CausalTransformer
from resflow.preprocess import LogitTransform, Normalize
from resflow.preprocess.noise import QuantizedGaussianNoise

from helpers import brute_logdet


def _res_vec() -> ResidualBlock:
    return ResidualBlock(residual_mlp(3, (8, 8)), EXACT_ESTIMATOR, EXACT_ESTIMATOR)


def _res_img() -> ResidualBlock:
    return ResidualBlock(residual_cnn(2, 8), EXACT_ESTIMATOR, EXACT_ESTIMATOR)


def _factor(prior: str) -> FactorOut:
    inner = Sequential(ActNorm(2), Flatten((2, 2, 2)))
    split = {
        "standard": None,
        "diagonal": DiagonalPrior((2, 2, 2)),
        "conditional": ConditionalPrior(torch.nn.Conv2d(2, 4, 3, padding=1)),
    }[prior]
    return FactorOut(inner, (4, 2, 2), split)


def _batchnorm(c: int) -> BatchNormFlow:
    """In evaluation mode with non-trivial running averages (the train-mode logdet is
    checked in tests/layers/test_batchnorm.py: a single example has other batch
    statistics than the batch)."""
    layer = BatchNormFlow(c)
    gen = torch.Generator().manual_seed(3)
    layer.running_mean.copy_(torch.randn(c, generator=gen))
    layer.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return layer.eval()


def _realnvp_coupling(mask) -> Coupling:
    """Evaluation mode: the net's batch norm uses running statistics."""
    net = partial(RealNVPResNet, hidden=8, n_blocks=1, context_channels=2)
    return Coupling.build((2, 4, 4), mask, Affine("exp"), net).eval()


def _made_layer(transformer, context: int = 0, residual: bool = False) -> Autoregressive:
    """A MADE-conditioned layer (zero-initialised output: the case perturbs it)."""
    made = MADE(4, (12, 12), transformer.n_params, order="random", seed=3,
                context_features=context, residual=residual, activation="tanh")  # fmt: skip
    return Autoregressive(made, transformer)


def _flowpp_coupling(mask, transformer, shape, size, attention=True) -> Coupling:
    """Flow++'s coupling: its net (vector context) and transformer."""
    c_a, c_b = mask.channels(shape)
    net = FlowppNet(c_a, transformer.n_params * c_b, size, hidden=8, blocks=1, heads=2,
                    attention=attention, context_channels=2)  # fmt: skip
    return Coupling(mask, net, transformer)


def _tarflow_block(flip: bool = False, context: int = 0, guidance: float | None = None):
    """A TarFlow block on 4 tokens of 3 features (zero-initialised output: perturbed)."""
    net = CausalTransformer(3, 6, tokens=4, width=16, depth=2, heads=2, context_features=context)
    block = TarFlowBlock(net, flip=flip)
    block.guidance = guidance
    return block


def _denseflow_coupling(mask, context: int = 0) -> Coupling:
    """DenseFlow's coupling: its dense-block + Nystrom-attention net (evaluation mode:
    the net's batch norm uses running statistics), or the dequantizer's context net."""
    if context:
        net = ContextDenseNet(2, 4, context_channels=context, hidden=6, depth=2, growth=3)
    else:
        net = DenseAttentionNet(2, 4, hidden=8, depth=2, growth=3, heads=2, landmarks=2)
    return Coupling(mask, net, SoftClampAffine()).eval()


LAYERS = {
    "coupling-denseflow": (lambda: _denseflow_coupling(ChannelMask()), (4, 3, 3), None),
    "coupling-denseflow-reverse": (lambda: _denseflow_coupling(ChannelMask(True)), (4, 1, 2), None),
    "coupling-denseflow-dequantizer": (
        lambda: _denseflow_coupling(ChannelMask(), context=2),
        (4, 2, 2),
        None,
    ),
    "unsqueeze": (Unsqueeze, (8, 2, 2), None),
    "tarflow-block": (_tarflow_block, (4, 3), None),
    "tarflow-block-flip-context": (lambda: _tarflow_block(True, context=2), (4, 3), None),
    "tarflow-block-guided": (lambda: _tarflow_block(context=2, guidance=2.5), (4, 3), None),
    "context-dropout-eval": (
        lambda: ContextDropout(_tarflow_block(context=2), p=0.5).eval(),
        (4, 3),
        None,
    ),
    "patchify": (lambda: Patchify((2, 4, 6), 2), (2, 4, 6), None),
    "coupling-flowpp-mixlog-column": (
        lambda: _flowpp_coupling(ColumnMask(), LogisticMixtureCDF(3), (2, 2, 2), (2, 1)),
        (2, 2, 2),
        None,
    ),
    "coupling-flowpp-affine-channel-noattn": (
        lambda: _flowpp_coupling(ChannelMask(True), Affine("tanh"), (2, 2, 2), (2, 2), False),
        (2, 2, 2),
        None,
    ),
    "coupling-column-affine": (
        lambda: Coupling.build((1, 2, 4), ColumnMask(True), Affine(), partial(ConvNet, hidden=8)),
        (1, 2, 4),
        None,
    ),
    "halves-column": (
        lambda: Halves(ColumnMask(True), InvertibleConv1x1(2, lu=False), ActNorm(2)),
        (2, 3, 4),
        None,
    ),
    "halves-channel": (
        lambda: Halves(ChannelMask(), InvertibleConv1x1(1, lu=False), InvertibleConv1x1(2)),
        (3, 2, 2),
        None,
    ),
    "element-actnorm": (lambda: ElementActNorm((2, 3, 3)), (2, 3, 3), None),
    "made-affine": (lambda: _made_layer(Affine("exp")), (4,), None),
    "made-affine-context": (lambda: _made_layer(Affine("exp"), context=2), (4,), None),
    "made-residual-affine": (lambda: _made_layer(Affine("exp"), residual=True), (4,), None),
    "made-dsf": (lambda: _made_layer(DSF(4)), (4,), None),
    "made-residual-spline": (
        lambda: _made_layer(RationalQuadraticSpline(4, bound=1.0), residual=True),
        (4,),
        None,
    ),
    "coupling-spline-alternate-context": (
        lambda: Coupling.build(
            (5,),
            AlternateMask(True),
            RationalQuadraticSpline(3, bound=1.0),
            partial(ResidualMLP, hidden=8, blocks=1, context_features=2),
        ),
        (5,),
        None,
    ),
    "coupling-spline-channel-img": (
        lambda: Coupling.build(
            (2, 3, 3),
            ChannelMask(),
            RationalQuadraticSpline(4, bound=1.0),
            partial(ConvNet, hidden=8),
        ),
        (2, 3, 3),
        None,
    ),
    "conv1x1-lu-permutation-vec": (lambda: InvertibleConv1x1(4, init="permutation"), (4,), None),
    "made-ddsf-context": (lambda: _made_layer(DDSF(4, 2), context=2), (4,), None),
    "batchnorm-vec": (lambda: _batchnorm(3), (3,), None),
    "batchnorm-img": (lambda: _batchnorm(2), (2, 3, 3), None),
    "conv1x1-lu-img": (lambda: InvertibleConv1x1(3), (3, 3, 3), None),
    "conv1x1-full-img": (lambda: InvertibleConv1x1(3, lu=False), (3, 3, 3), None),
    "conv1x1-lu-vec": (lambda: InvertibleConv1x1(4), (4,), None),
    "coupling-realnvp-checkerboard": (
        lambda: _realnvp_coupling(CheckerboardMask(True)),
        (2, 4, 4),
        None,
    ),
    "coupling-realnvp-channel": (lambda: _realnvp_coupling(ChannelMask()), (2, 4, 4), None),
    "coupling-realnvp-mlp": (
        lambda: Coupling.build(
            (4,),
            ChannelMask(True),
            Affine("exp"),
            partial(RealNVPMLP, hidden=(8,), context_features=2),
        ),
        (4,),
        None,
    ),
    "coupling-glow-affine": (
        lambda: Coupling.build(
            (4, 3, 3),
            ChannelMask(),
            Affine("sigmoid"),
            partial(GlowNet, hidden=8, context_channels=2),
        ),
        (4, 3, 3),
        None,
    ),
    "coupling-glow-additive": (
        lambda: Coupling.build((4, 3, 3), ChannelMask(), Additive(), partial(GlowNet, hidden=8)),
        (4, 3, 3),
        None,
    ),
    "actnorm-vec": (lambda: ActNorm(3), (3,), None),
    "actnorm-img": (lambda: ActNorm(2), (2, 4, 4), None),
    "residual-vec": (_res_vec, (3,), None),
    "residual-img": (_res_img, (2, 4, 4), None),
    "logit": (lambda: LogitTransform(0.05), (2, 2, 2), None),
    "quantized-noise": (lambda: QuantizedGaussianNoise(17, 1e-3), (2, 2, 2), None),
    "glow-top-prior": (lambda: GlowTopPrior((2, 4, 4)), (2, 4, 4), None),
    "glow-top-prior-labels": (lambda: GlowTopPrior((2, 2, 2), n_classes=3), (2, 2, 2), (3,)),
    "normalize": (lambda: Normalize((0.5, 0.2), (2.0, 0.7)), (2, 2, 2), None),  # prod != 1
    "squeeze": (lambda: Squeeze(2), (1, 4, 4), None),
    "flatten": (lambda: Flatten((2, 2, 2)), (2, 2, 2), None),
    "factor-out-standard": (lambda: _factor("standard"), (4, 2, 2), None),
    "factor-out-diagonal": (lambda: _factor("diagonal"), (4, 2, 2), None),
    "factor-out-conditional": (lambda: _factor("conditional"), (4, 2, 2), None),
    "sequential": (lambda: Sequential(ActNorm(3), _res_vec(), ActNorm(3)), (3,), None),
    "inverse-of-actnorm": (lambda: Inverse(ActNorm(3)), (3,), None),
    "inverse-of-coupling": (
        lambda: Inverse(COUPLING_CASES["coupling-alternate-affine-exp-vec"][0]()),
        (5,),
        None,
    ),
    **COUPLING_CASES,
}
DEFAULT_CONTEXT = (2,)
"""Context passed to layers that take none: they must accept and ignore it."""


def _input(name: str, shape: tuple[int, ...], n: int = 4) -> torch.Tensor:
    if name == "logit":
        return torch.rand(n, *shape) * 0.9 + 0.05
    if name == "quantized-noise":
        return torch.randint(0, 17, (n, *shape)).float()
    return torch.randn(n, *shape)


@pytest.fixture(params=sorted(LAYERS))
def case(request):
    make, shape, ctx_shape = LAYERS[request.param]
    torch.manual_seed(0)
    layer = make()
    x = _input(request.param, shape)
    ctx = torch.randn(len(x), *(ctx_shape or DEFAULT_CONTEXT))
    layer(x, ctx)  # data-dependent initialisation, lazy buffers
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return request.param, layer, x, ctx


def test_round_trip(case):
    _, layer, x, ctx = case
    y, _ = layer(x, ctx)
    torch.testing.assert_close(layer.inverse(y, ctx), x, atol=1e-5, rtol=1e-5)


def test_logdet_matches_brute_force_jacobian(case):
    _, layer, x, ctx = case
    x, ctx, layer = x.double(), ctx.double(), layer.double()
    _, logdet = layer(x, ctx)
    brute = torch.stack(
        [brute_logdet(lambda t, c=c: layer(t, c.unsqueeze(0)), xi.unsqueeze(0))[0]
         for xi, c in zip(x, ctx)]
    )  # fmt: skip
    torch.testing.assert_close(logdet, brute, atol=1e-6, rtol=1e-6)


def test_inverse_and_logdet(case):
    _, layer, x, ctx = case
    x, ctx, layer = x.double(), ctx.double(), layer.double()
    y, logdet = layer(x, ctx)
    x_back, logdet_inv = layer.inverse_and_logdet(y, ctx)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-8, rtol=1e-8)


def test_output_shape_is_the_real_output_shape(case):
    _, layer, x, ctx = case
    y, logdet = layer(x, ctx)
    assert tuple(y.shape[1:]) == layer.output_shape(tuple(x.shape[1:]))
    assert logdet.shape == (len(x),)


def test_gradients_reach_every_parameter(case):
    name, layer, x, ctx = case
    x.requires_grad_(True)
    y, logdet = layer(x, ctx)
    (y.pow(2).sum() - logdet.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"


def test_state_dict_round_trip(case):
    name, layer, x, ctx = case
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = LAYERS[name][0]()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.manual_seed(1)  # stochastic layers draw the same noise
    y = fresh(x, ctx)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(y, layer(x, ctx)[0])


def test_dtype_move(case):
    _, layer, x, ctx = case
    y64, ld64 = layer.double()(x.double(), ctx.double())
    assert y64.dtype == torch.float64 and ld64.dtype == torch.float64


# ---- models -------------------------------------------------------------------------------
_EXACT = EstimatorConfig(train_method="exact", eval_method="exact")
_TINY_IMAGE = dict(image_shape=(1, 4, 4), levels=17, n_blocks=(1, 1), hidden=8)
MODELS_TINY = {
    "residual-flow-vector": lambda: get_preset("toy2d", n_blocks=2, hidden=(16,), dim=2),
    "residual-flow": lambda: get_preset(
        "digits-small", **_TINY_IMAGE, fc_blocks=1, fc_hidden=(8,), estimator=_EXACT
    ),
    "iresnet": lambda: IResNetConfig(**_TINY_IMAGE, squeeze_first=False, estimator=_EXACT),
    "iresnet-vector": lambda: IResNetVectorConfig(n_blocks=2, hidden=(16,), estimator=_EXACT),
    "realnvp": lambda: RealNVPConfig(
        image_shape=(1, 4, 4),
        levels=17,
        n_scales=2,
        hidden=8,
        n_blocks=1,
        checkerboard=1,
        channelwise=1,
        last_checkerboard=1,
        split_prior="conditional",
    ),
    "realnvp-vector": lambda: RealNVPVectorConfig(n_couplings=2, hidden=(8,), batchnorm=True),
    "glow": lambda: GlowConfig(image_shape=(1, 4, 4), levels=17, n_levels=2, depth=1, hidden=8),
    "glow-vector": lambda: GlowVectorConfig(depth=2, hidden=(8,)),
    "flowpp": lambda: FlowppConfig(
        image_shape=(1, 4, 4),
        levels=17,
        couplings=(1, 1, 1),
        hidden=8,
        blocks=1,
        components=2,
        heads=2,
        dropout=0.0,
        dequantization=DequantizationConfig(
            kind="variational",
            couplings=1,
            hidden=8,
            blocks=1,
            components=2,
            heads=2,
            context_hidden=4,
            context_blocks=1,
        ),
    ),  # fmt: skip
    "tarflow": lambda: TarFlowConfig(
        image_shape=(1, 4, 4), levels=17, patch_size=2, width=16, n_blocks=2, depth=1, heads=2
    ),
    "residual-flow-hybrid": lambda: get_preset(
        "hybrid-digits", **_TINY_IMAGE, head_channels=4, estimator=_EXACT
    ),
    "denseflow": lambda: DenseFlowConfig(
        image_shape=(1, 4, 4),
        levels=17,
        units=(2, 1),
        modules=(1, 1),
        hidden=(4, 4),
        growth=2,
        dense_depth=1,
        dense_growth=4,
        heads=1,
        landmarks=2,
    ),
    "maf": lambda: MAFConfig(dim=3, n_flows=2, hidden=(8,), batch_norm=True),
    "naf": lambda: NAFConfig(dim=3, n_flows=2, hidden=(8,), sigmoid_units=4),
    "nsf": lambda: NSFConfig(dim=3, n_flows=2, hidden=8, blocks=1, bins=4),
    "nsf-image": lambda: NSFImageConfig(
        image_shape=(1, 4, 4), levels=17, n_levels=2, steps=1, hidden=8, blocks=1, bins=4
    ),
}


def test_every_registered_model_is_in_the_contract_test():
    assert set(MODELS) == set(MODELS_TINY)


def _model_input(model, n=6):
    if model.levels is not None:
        return torch.randint(0, model.levels, (n, *model.shape))
    return torch.randn(n, *model.shape)


@pytest.mark.parametrize("name", sorted(MODELS_TINY))
def test_model_log_prob_sampling_and_state(name):
    torch.manual_seed(0)
    model = build_model(MODELS_TINY[name]())
    x = _model_input(model)
    logp = model.log_prob(x)
    assert logp.shape == (6,) and torch.isfinite(logp).all()
    loss = -logp.mean()
    if hasattr(model, "logits"):  # a hybrid model: its classifier's weights too
        loss = loss + model.logits(x).logsumexp(1).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} gets no gradient"
    model.eval()
    s = model.sample(3, temperature=0.7)
    assert s.shape == (3, *model.shape)
    with torch.no_grad():
        z, _ = model(x)
    assert tuple(z.shape[1:]) == model.latent_shape
    torch.testing.assert_close(model.inverse(z), x.to(z.dtype), atol=1e-4, rtol=1e-4)
    fresh = build_model(MODELS_TINY[name]())
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    torch.manual_seed(1)
    a = model.log_prob(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fresh.log_prob(x), a)


@pytest.mark.parametrize(
    "name", ["residual-flow-vector", "iresnet-vector", "realnvp-vector", "glow-vector"]
)
def test_sample_and_log_prob_agrees_with_log_prob(name):
    torch.manual_seed(0)
    model = build_model(MODELS_TINY[name]()).double()
    model(torch.randn(64, 2, dtype=torch.float64))  # ActNorm initialisation
    model.eval()
    x, logp = model.sample_and_log_prob(5)
    torch.testing.assert_close(logp, model.log_prob(x.detach()), atol=1e-6, rtol=1e-6)
    # differentiable in the parameters (reverse-KL / variational inference)
    (logp.mean() + x.pow(2).mean()).backward()  # a reverse-KL-like loss of x and log p
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_model_rejects_bad_input():
    model = build_model(MODELS_TINY["residual-flow-vector"]())
    with pytest.raises(ValueError, match=r"expected data of shape \[B, 2\]"):
        model.log_prob(torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        model.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="empty batch"):
        model.log_prob(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="number of samples must be >= 1"):
        model.sample(0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.sample(2, temperature=-1.0)
