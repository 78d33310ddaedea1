"""RealNVP (Dinh, Sohl-Dickstein & Bengio, ICLR 2017): configs, builders, presets.

Registered as ``realnvp`` (images) and ``realnvp-vector`` (2-D and tabular data).
Per scale (§3.6, §4.1): 3 checkerboard affine couplings (alternating masks) ->
squeeze -> 3 channel-wise couplings (alternating) -> factor out half; the last scale
has 4 checkerboard couplings; with ``double_features`` (the paper presets) the nets'
feature maps double at each downscale (§3.6), ``hidden * 2^i`` at scale ``i`` and
twice that in the channel-wise couplings after its squeeze, as in the authors' code.
The couplings' ``s, t`` come from a residual conv net
with batch and weight normalization, ``s = scale * tanh(.)`` (:mod:`resflow.nets.realnvp`),
and every coupling is followed by batch normalization as a flow layer
(:class:`~resflow.layers.batchnorm.BatchNormFlow`, with the running averages of
Appendix E). Data: ``logit(alpha + (1 - 2 alpha) x)`` with ``alpha = 0.05``; the paper's
L2 of 5e-5 on the weight-norm scales is the model's training penalty.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from resflow.config import param
from resflow.distributions import make_base
from resflow.flow import Flow
from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.batchnorm import BatchNormFlow
from resflow.layers.coupling import ChannelMask, CheckerboardMask, Coupling, Mask
from resflow.layers.multiscale import ConditionalPrior
from resflow.layers.transformers import Affine
from resflow.models.configs import (
    MAX_WIDTH,
    ClassConditionalConfig,
    ImageModelConfig,
    VectorModelConfig,
)
from resflow.models.dequantization import build_dequantizer
from resflow.models.multiscale import count_scales, multiscale
from resflow.models.registry import register_model, register_preset
from resflow.nets.glow import ZeroConv2d
from resflow.nets.realnvp import RealNVPMLP, RealNVPResNet
from resflow.preprocess import image_preprocessing
from resflow.train_config import TrainConfig


@dataclass
class RealNVPConfig(ClassConditionalConfig, ImageModelConfig):
    """Multi-scale RealNVP for images (defaults: the paper's 32x32 ImageNet model)."""

    n_scales: int = param(4, ge=1, le=16, help="scales (at most: until 4x4)")
    hidden: int = param(32, ge=1, le=MAX_WIDTH, help="feature maps of the coupling nets")
    double_features: bool = param(
        False,
        help="double the coupling nets' feature maps at each downscale (§3.6): hidden * 2^i "
        "at scale i, twice that in its channel-wise couplings (the paper presets)",
    )
    n_blocks: int = param(4, ge=1, le=64, help="residual units per coupling net")
    checkerboard: int = param(3, ge=1, le=64, help="checkerboard couplings per scale")
    channelwise: int = param(3, ge=0, le=64, help="channel-wise couplings after each squeeze")
    last_checkerboard: int = param(4, ge=1, le=64, help="checkerboard couplings, last scale")
    batchnorm: bool = param(True, help="batch normalization flow layer after each coupling")
    bn_momentum: float = param(0.95, ge=0, lt=1, help="weight of the stored BN averages")
    split_prior: Literal["standard", "conditional"] = param(
        "standard", help="prior of the factored halves"
    )
    logit_alpha: float = param(0.05, gt=0, lt=0.5, help="alpha of the logit transform")
    scale_l2: float = param(5e-5, ge=0, help="L2 penalty on the weight-norm scales")


@dataclass
class RealNVPVectorConfig(VectorModelConfig):
    """RealNVP for vectors: affine couplings with alternating halves."""

    dim: int = param(2, ge=2, le=1_000_000, help="data dimension")
    n_couplings: int = param(8, ge=1, le=1024, help="affine couplings")
    hidden: tuple[int, ...] = param((64, 64), ge=1, le=MAX_WIDTH, help="widths of the s/t MLPs")
    batchnorm: bool = param(False, help="batch normalization flow layer after each coupling")
    bn_momentum: float = param(0.95, ge=0, lt=1, help="weight of the stored BN averages")


def feature_maps(cfg: RealNVPConfig, scale: int, channelwise: bool = False) -> int:
    """Feature maps of the coupling nets of scale ``scale`` (its channel-wise couplings,
    after the squeeze, with ``channelwise``): ``hidden``, or with ``double_features``
    ``hidden * 2^scale`` and ``hidden * 2^(scale + 1)`` (the authors' code)."""
    if not cfg.double_features:
        return cfg.hidden
    return cfg.hidden * 2 ** (scale + int(channelwise))


def build_realnvp(cfg: RealNVPConfig) -> Flow:
    ctx = cfg.n_classes

    def coupling(shape: Shape, mask: Mask, hidden: int) -> list[FlowLayer]:
        subnet = partial(
            RealNVPResNet,
            hidden=hidden,
            n_blocks=cfg.n_blocks,
            context_channels=ctx,
            scale_l2=cfg.scale_l2,
        )
        layer = Coupling.build(shape, mask, Affine("exp"), subnet)
        if cfg.batchnorm:
            return [layer, BatchNormFlow(shape[0], cfg.bn_momentum)]
        return [layer]

    def couplings(shape: Shape, n: int, checker: bool, hidden: int) -> list[FlowLayer]:
        layers: list[FlowLayer] = []
        for j in range(n):
            mask: Mask = CheckerboardMask(j % 2 == 1) if checker else ChannelMask(j % 2 == 1)
            layers += coupling(shape, mask, hidden)
        return layers

    n = count_scales(cfg.image_shape, cfg.n_scales)
    if n < 1:
        raise ValueError(f"image {cfg.image_shape[1:]} is too small for RealNVP (need >= 4x4)")

    def step(i: int, shape: Shape) -> list[FlowLayer]:
        k = cfg.last_checkerboard if i == n - 1 else cfg.checkerboard
        return couplings(shape, k, True, feature_maps(cfg, i))

    def prior(i: int, half: Shape, kept: Shape) -> ConditionalPrior | None:
        if cfg.split_prior == "standard":
            return None
        return ConditionalPrior(ZeroConv2d(kept[0], 2 * half[0]))

    dequantizer = build_dequantizer(cfg.dequantization, cfg.levels, cfg.image_shape)
    layers = image_preprocessing(cfg.levels, cfg.logit_alpha, cfg.horizontal_flip, dequantizer)
    layers += multiscale(
        cfg.image_shape,
        n,
        step,
        after_squeeze=lambda i, shape: couplings(
            shape, cfg.channelwise, False, feature_maps(cfg, i, channelwise=True)
        ),
        factor_out=True,
        prior=prior,
    )
    body = Sequential(layers)
    latent = body.output_shape(cfg.image_shape)
    return Flow(
        body,
        cfg.image_shape,
        base=make_base(latent, n_classes=cfg.n_classes),
        levels=cfg.levels,
        n_classes=cfg.n_classes or None,
    )


def build_realnvp_vector(cfg: RealNVPVectorConfig) -> Flow:
    layers: list[FlowLayer] = []
    for j in range(cfg.n_couplings):
        subnet = partial(RealNVPMLP, hidden=cfg.hidden, context_features=cfg.context_features)
        layers.append(Coupling.build((cfg.dim,), ChannelMask(j % 2 == 1), Affine("exp"), subnet))
        if cfg.batchnorm:
            layers.append(BatchNormFlow(cfg.dim, cfg.bn_momentum))
    return Flow(Sequential(layers), (cfg.dim,), context_features=cfg.context_features)


register_model(
    "realnvp",
    config=RealNVPConfig,
    build=build_realnvp,
    kind="image",
    description="RealNVP for images (Dinh et al. 2017)",
)
register_model(
    "realnvp-vector",
    config=RealNVPVectorConfig,
    build=build_realnvp_vector,
    kind="vector",
    family="realnvp",
    description="RealNVP for vectors and 2-D data",
)

# ---- presets: the paper (§4.1) ---------------------------------------------------------------
_PAPER = (
    "paper architecture (Dinh et al. 2017, §3.6, §4.1), feature maps doubling at each downscale"
)
# what still differs from the authors' code (tensorflow/models research/real_nvp)
_DIFFERENCES = (
    "; differences from the authors' code: the nets see the plain masked input (theirs: "
    "batch-normed, concatenated ReLU [x, -x], and in the checkerboard couplings the mask as "
    "a channel), a 3x3 zero-initialised output conv without weight norm and a per-channel "
    "tanh scale starting at 1 (theirs: a weight-normed 1x1 output and one scalar scale per "
    "coupling, starting at 0 in the checkerboard couplings and at 1 in the channel-wise "
    "ones), batch normalization of every channel after a coupling (theirs: of the "
    "transformed part only), the factored half chosen by resflow's squeeze order (theirs: "
    "an ordered re-squeeze of the unsqueezed scale)"
)
# the authors' hyperparameters: Adam (0.9, 0.999) at 1e-3, batch 64, clipping at norm 100, no
# warm-up, no weight averaging (the L2 of 5e-5 is the model's penalty, scale_l2)
_ADAM = TrainConfig(
    lr=1e-3, batch_size=64, weight_decay=0.0, betas=(0.9, 0.999), warmup=0, grad_clip=100.0,
    ema_decay=0.0,
)  # fmt: skip
register_preset(
    "realnvp-cifar10",
    "realnvp",
    RealNVPConfig(
        image_shape=(3, 32, 32),
        n_scales=2,
        hidden=64,
        n_blocks=8,
        double_features=True,
        horizontal_flip=True,
    ),  # fmt: skip
    train=_ADAM,
    description="CIFAR-10 (8 residual blocks, 64 features at 32x32 and 128 after the one "
    f"downscale; 19,552,739 parameters), {_PAPER}{_DIFFERENCES}",
)
register_preset(
    "realnvp-imagenet32",
    "realnvp",
    RealNVPConfig(image_shape=(3, 32, 32), n_scales=4, hidden=32, n_blocks=4, double_features=True),
    train=_ADAM,
    description="ImageNet 32x32 (4 residual blocks, 32 features doubling to 256; 46,052,973 "
    f"parameters), {_PAPER}{_DIFFERENCES}",
)
register_preset(
    "realnvp-imagenet64",
    "realnvp",
    RealNVPConfig(image_shape=(3, 64, 64), n_scales=5, hidden=32, n_blocks=2, double_features=True),
    train=_ADAM,
    description="ImageNet 64x64 (2 residual blocks, 32 features doubling to 512; 95,574,053 "
    f"parameters), {_PAPER}{_DIFFERENCES}",
)
register_preset(
    "realnvp-celeba",
    "realnvp",
    RealNVPConfig(
        image_shape=(3, 64, 64),
        n_scales=5,
        hidden=32,
        n_blocks=2,
        double_features=True,
        horizontal_flip=True,
    ),  # fmt: skip
    train=_ADAM,
    description="CelebA 64x64 (2 residual blocks, 32 features doubling to 512; 95,574,053 "
    f"parameters), {_PAPER}{_DIFFERENCES}",
)
_SMALL = TrainConfig(lr=1e-3, batch_size=64, weight_decay=0.0, warmup=100, grad_clip=100.0)
register_preset(
    "realnvp-digits",
    "realnvp",
    RealNVPConfig(image_shape=(1, 8, 8), levels=17, n_scales=2, hidden=32, n_blocks=2),
    train=_SMALL,
    description="8x8 digits in a few minutes on CPU",
    default_for=("digits",),
)
register_preset(
    "realnvp-mnist",
    "realnvp",
    RealNVPConfig(image_shape=(1, 28, 28), n_scales=3, hidden=32, n_blocks=2),
    train=_SMALL,
    description="MNIST-sized images on CPU",
    default_for=("mnist", "fashion-mnist"),
)
register_preset(
    "realnvp-toy2d",
    "realnvp-vector",
    RealNVPVectorConfig(dim=2, n_couplings=8, hidden=(64, 64)),
    train=TrainConfig(lr=2e-3, batch_size=500, weight_decay=0.0, warmup=50, ema_decay=0.995),
    description="2-D densities in minutes on CPU",
    default_for=("vector",),
)
