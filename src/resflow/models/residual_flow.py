"""Residual Flows (Chen et al. 2019) for vectors and images: configs, builders, presets.

Registered as ``residual-flow`` (images, Appendix E of the paper) and
``residual-flow-vector`` (2-D and tabular data). The paper presets have the authors'
parameter counts: MNIST 16,608,693; CIFAR-10 25,174,233; ImageNet32 47,099,289;
ImageNet64 53,294,475.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from resflow.config import ConfigError, param
from resflow.distributions import make_base
from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.multiscale import Flatten
from resflow.layers.residual.block import ResidualBlock
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.layers.residual.spectral import (
    CERTIFY_EVERY,
    set_certify_every,
    set_power_iterations,
)
from resflow.models.configs import (
    MAX_CLASSES,
    MAX_SIDE,
    MAX_WIDTH,
    ClassConditionalConfig,
    ImageModelConfig,
    VectorModelConfig,
)
from resflow.models.dequantization import build_dequantizer
from resflow.models.multiscale import count_scales, multiscale
from resflow.models.registry import register_model, register_preset
from resflow.nets.residual import residual_cnn, residual_mlp
from resflow.preprocess import image_preprocessing
from resflow.train_config import TrainConfig

Activation = Literal["lipswish", "elu", "softplus"]
MAX_BLOCKS = 4096
MAX_WEIGHTS = 1_000_000_000
"""Configs whose weights would exceed this many numbers (4 GB in float32) are refused
before anything is built (a crafted or mistyped config must not hang the machine)."""


def _check_size(what: str, n_weights: int) -> None:
    if n_weights > MAX_WEIGHTS:
        raise ConfigError(
            f"{what}: about {n_weights:,} weights, more than the {MAX_WEIGHTS:,} resflow builds"
        )


@dataclass
class VectorFlowConfig(VectorModelConfig):
    """Residual Flow for vectors / 2-D data: ``[ActNorm] -> (ResBlock -> [ActNorm]) x n``.

    With ``context_features`` every branch is conditioned on the context ``c``
    (:class:`~resflow.nets.residual.ConditionedBranch`: its first layer shifted by
    ``V c``, which leaves ``Lip(g)`` in ``x`` unchanged).
    """

    n_blocks: int = param(10, ge=1, le=MAX_BLOCKS, help="residual blocks")
    hidden: tuple[int, ...] = param(
        (128, 128, 128), ge=1, le=MAX_WIDTH, help="hidden widths of each branch"
    )
    coeff: float = param(0.98, gt=0, lt=1, help="Lipschitz coefficient of every layer (< 1)")
    activation: Activation = param("lipswish", help="1-Lipschitz activation")
    actnorm: bool = param(True, help="ActNorm before the first and after every block")
    norm_orders: tuple[float, ...] | None = param(None, ge=1, help="induced-norm orders")
    learn_orders: bool = param(False, help="learn the norm orders")
    prior: Literal["standard", "diagonal"] = param("standard", help="base distribution")
    certify_every: int = param(
        CERTIFY_EVERY, ge=1, le=1_000_000, help="training steps between certified norm bounds"
    )
    power_iterations: int = param(
        0,
        ge=0,
        le=10_000,
        help="power iterations between certificates: 0 until the estimate settles, k > 0 "
        "exactly k with no value read on the host (the authors' --n-lipschitz-iters)",
    )
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = (self.dim, *self.hidden, self.dim)
        per_block = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        _check_size("n_blocks x hidden", self.n_blocks * per_block)


@dataclass
class ImageFlowConfig(ClassConditionalConfig, ImageModelConfig):
    """Multi-scale Residual Flow for images (Appendix E of the paper).

    ``Dequantize -> [flip] -> Logit(alpha) -> [Squeeze] -> ActNorm -> (ResBlock ->
    ActNorm) x n_0 -> Squeeze -> [FactorOut] -> ... -> fully connected tail``.
    """

    image_shape: tuple[int, int, int] = param((1, 28, 28), ge=1, le=MAX_SIDE, help="(C, H, W)")
    n_blocks: tuple[int, ...] = param(
        (16, 16, 16), ge=1, le=MAX_BLOCKS, help="residual blocks per scale"
    )
    hidden: int = param(512, ge=1, le=MAX_WIDTH, help="hidden channels of each branch")
    kernels: tuple[int, ...] = param((3, 1, 3), ge=1, le=15, help="kernel sizes of each branch")
    coeff: float = param(0.98, gt=0, lt=1, help="Lipschitz coefficient of every layer (< 1)")
    activation: Activation = param("lipswish", help="1-Lipschitz activation")
    logit_alpha: float = param(1e-6, gt=0, lt=0.5, help="alpha of the logit transform")
    squeeze_first: bool = param(False, help="squeeze before the first scale")
    factor_out: bool = param(False, help="factor out half the channels after each squeeze")
    actnorm: bool = param(True, help="ActNorm layers")
    actnorm_position: Literal["after", "before"] = param(
        "after", help="ActNorm after every block (Residual Flows) or before (i-ResNet)"
    )
    fc_end: bool = param(True, help="fully connected residual blocks at the end")
    fc_blocks: int = param(4, ge=0, le=MAX_BLOCKS, help="fully connected blocks at the end")
    fc_hidden: tuple[int, ...] = param((128, 128), ge=1, le=MAX_WIDTH, help="their hidden widths")
    norm_orders: tuple[float, ...] | None = param(None, ge=1, help="induced-norm orders")
    learn_orders: bool = param(False, help="learn the norm orders")
    prior: Literal["standard", "diagonal"] = param("standard", help="base distribution")
    n_classes: int = param(0, ge=0, le=MAX_CLASSES, help="classes of a class-conditional prior")
    certify_every: int = param(
        CERTIFY_EVERY, ge=1, le=1_000_000, help="training steps between certified norm bounds"
    )
    power_iterations: int = param(
        0,
        ge=0,
        le=10_000,
        help="power iterations between certificates: 0 until the estimate settles, k > 0 "
        "exactly k with no value read on the host (the authors' --n-lipschitz-iters)",
    )
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        c, h, w = self.image_shape
        k2 = max(self.kernels) ** 2
        conv = sum(self.n_blocks) * self.hidden * (self.hidden + 2 * k2 * 16 * c)
        d = c * h * w
        widths = (d, *self.fc_hidden, d)
        fc = self.fc_blocks * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        _check_size("the model's blocks", conv + (fc if self.fc_end else 0))


def build_vector_flow(cfg: VectorFlowConfig) -> Flow:
    layers: list[FlowLayer] = [ActNorm(cfg.dim)] if cfg.actnorm else []
    for _ in range(cfg.n_blocks):
        g = residual_mlp(
            cfg.dim,
            cfg.hidden,
            cfg.coeff,
            cfg.activation,
            True,
            cfg.norm_orders,
            cfg.learn_orders,
            context_features=cfg.context_features,
        )
        layers.append(ResidualBlock.from_config(g, cfg.estimator))
        if cfg.actnorm:
            layers.append(ActNorm(cfg.dim))
    flow = Flow(
        Sequential(layers),
        (cfg.dim,),
        base=make_base((cfg.dim,), cfg.prior),
        context_features=cfg.context_features,
    )
    set_certify_every(flow, cfg.certify_every)
    set_power_iterations(flow, cfg.power_iterations)
    return flow


def build_image_flow(cfg: ImageFlowConfig) -> Flow:
    """The multi-scale model of ``cfg`` (also i-ResNet's, with its own defaults)."""
    est = cfg.estimator
    before = cfg.actnorm and cfg.actnorm_position == "before"
    after = cfg.actnorm and cfg.actnorm_position == "after"

    def step(i: int, shape: Shape) -> list[FlowLayer]:
        c = shape[0]
        layers: list[FlowLayer] = [ActNorm(c)] if i == 0 and after else []
        for b in range(cfg.n_blocks[i]):
            g = residual_cnn(
                c,
                cfg.hidden,
                cfg.kernels,
                cfg.coeff,
                cfg.activation,
                preact=not (i == 0 and b == 0),
                norm_orders=cfg.norm_orders,
                learn_orders=cfg.learn_orders,
            )
            if before:
                layers.append(ActNorm(c))
            layers.append(ResidualBlock.from_config(g, est))
            if after:
                layers.append(ActNorm(c))
        return layers

    def final(shape: Shape) -> list[FlowLayer]:
        d = math.prod(shape)
        layers: list[FlowLayer] = [Flatten(shape)]
        if cfg.fc_end:
            for _ in range(cfg.fc_blocks):
                g = residual_mlp(d, cfg.fc_hidden, cfg.coeff, cfg.activation)
                if before:
                    layers.append(ActNorm(d))
                layers.append(ResidualBlock.from_config(g, est))
                if after:
                    layers.append(ActNorm(d))
        return layers

    dequantizer = build_dequantizer(cfg.dequantization, cfg.levels, cfg.image_shape)
    layers = image_preprocessing(cfg.levels, cfg.logit_alpha, cfg.horizontal_flip, dequantizer)
    n = count_scales(cfg.image_shape, len(cfg.n_blocks), cfg.squeeze_first)
    _, h, w = cfg.image_shape
    if cfg.squeeze_first and (h % 2 or w % 2):
        raise ValueError(f"squeeze_first needs an even image size, got {h}x{w}")
    if n < 1:
        raise ValueError(f"image {h}x{w} is too small for a multi-scale model (need >= 4x4)")
    layers += multiscale(
        cfg.image_shape,
        n,
        step,
        final=final,
        squeeze_first=cfg.squeeze_first,
        factor_out=cfg.factor_out,
    )
    body = Sequential(layers)
    latent = body.output_shape(cfg.image_shape)
    flow = Flow(
        body,
        cfg.image_shape,
        base=make_base(latent, cfg.prior, cfg.n_classes),
        levels=cfg.levels,
        n_classes=cfg.n_classes or None,
    )
    set_certify_every(flow, cfg.certify_every)
    set_power_iterations(flow, cfg.power_iterations)
    return flow


register_model(
    "residual-flow",
    config=ImageFlowConfig,
    build=build_image_flow,
    kind="image",
    description="Residual Flow for images (Chen et al. 2019)",
)
register_model(
    "residual-flow-vector",
    config=VectorFlowConfig,
    build=build_vector_flow,
    kind="vector",
    family="residual-flow",
    description="Residual Flow for vectors and 2-D data",
)

# ---- presets: the paper (Chen et al. 2019, Appendix E) ----------------------------------
_PAPER = "paper architecture (Appendix E)"
_RF_TRAINING = (
    "decoupled weight decay 5e-4 as in the paper (their default is 0, and their optimizer "
    "never applies it), EMA decay ramped up to 0.999 (theirs: 0.999 from the first step), "
    "power iteration stopped on the norm estimate with a certified bound every 10 steps "
    "(theirs: stopped on the vectors' change)"
)
_RF_DIFFERENCES = "; differs from the authors' code (rtqichen/residual-flows): " + _RF_TRAINING
register_preset(
    "mnist",
    "residual-flow",
    ImageFlowConfig(image_shape=(1, 28, 28), n_blocks=(16, 16, 16), logit_alpha=1e-6),
    description=f"MNIST, {_PAPER}; 16,608,693 parameters, the authors' count; logit alpha 1e-6 "
    "as their code (paper: 1e-5)" + _RF_DIFFERENCES,
)
register_preset(
    "cifar10",
    "residual-flow",
    ImageFlowConfig(
        image_shape=(3, 32, 32), n_blocks=(16, 16, 16), logit_alpha=0.05, horizontal_flip=True
    ),
    description=f"CIFAR-10, {_PAPER}; 25,174,233 parameters, the authors' count" + _RF_DIFFERENCES,
)
register_preset(
    "imagenet32",
    "residual-flow",
    ImageFlowConfig(image_shape=(3, 32, 32), n_blocks=(32, 32, 32), logit_alpha=0.05),
    description=f"ImageNet 32x32, {_PAPER}; 47,099,289 parameters, the authors' count; the 4-block "
    "fully connected tail as their code (the paper: MNIST and CIFAR-10 only)" + _RF_DIFFERENCES,
)
register_preset(
    "imagenet64",
    "residual-flow",
    ImageFlowConfig(
        image_shape=(3, 64, 64),
        n_blocks=(32, 32, 32),
        logit_alpha=0.05,
        squeeze_first=True,
        factor_out=True,
    ),
    description=f"ImageNet 64x64, {_PAPER}; 53,294,475 parameters, the authors' count; the 4-block "
    "fully connected tail as their code (the paper: MNIST and CIFAR-10 only)" + _RF_DIFFERENCES,
)
register_preset(
    "celebahq256",
    "residual-flow",
    ImageFlowConfig(
        image_shape=(3, 256, 256),
        levels=32,
        n_blocks=(16,) * 6,
        logit_alpha=0.05,
        squeeze_first=True,
        factor_out=True,
        horizontal_flip=True,
    ),
    description=f"CelebA-HQ 256x256 at 5 bits, {_PAPER}; 143,209,419 parameters; differs from "
    "the authors' command: LipSwish (theirs: ELU), a 4-block fully connected tail (theirs and the "
    "paper: none; 136,777,368 parameters), 2 exact series terms (theirs: 8), batch 64 (theirs: "
    "8 x 5 accumulated), " + _RF_TRAINING,
)

# ---- small presets that train in minutes on 2 CPU cores -----------------------------------
_SMALL_TRAIN = TrainConfig(lr=2e-3, batch_size=64, warmup=100)
register_preset(
    "digits-small",
    "residual-flow",
    ImageFlowConfig(
        image_shape=(1, 8, 8),
        levels=17,
        n_blocks=(4, 4),
        hidden=64,
        logit_alpha=1e-3,
        fc_blocks=2,
        fc_hidden=(64, 64),
    ),
    # measured on the digits' test split (benchmarks/readme_job.py, docs/RESULTS.md):
    # 600 steps at lr 5e-3 end lower (1.99 bits/dim) than 1000 at 2e-3 (2.03)
    train=TrainConfig(lr=5e-3, batch_size=64, warmup=100, steps=600, eval_every=600),
    description="8x8 digits in about two minutes on CPU",
    default_for=("digits",),
)
register_preset(
    "mnist-small",
    "residual-flow",
    ImageFlowConfig(
        image_shape=(1, 28, 28),
        n_blocks=(2, 2, 2),
        hidden=64,
        logit_alpha=1e-6,
        fc_blocks=2,
        fc_hidden=(64, 64),
    ),
    train=_SMALL_TRAIN,
    description="MNIST-sized images on CPU",
    default_for=("mnist", "fashion-mnist"),
)
_EXACT = EstimatorConfig(train_method="auto", eval_method="auto")
# the exact logdet for blocks of at most 16 dimensions (the 2-D presets: always exact), the
# series above: the default vector preset on 1000-D data would otherwise build the full
# Jacobian in every block of every step (its cost: docs/RESULTS.md)
register_preset(
    "toy2d",
    "residual-flow-vector",
    VectorFlowConfig(dim=2, n_blocks=20, hidden=(64, 64), coeff=0.98, estimator=_EXACT),
    # tuned on 8gaussians (benchmarks/toy2d.py; the figures: docs/RESULTS.md)
    train=TrainConfig(lr=1e-2, batch_size=500, weight_decay=0.0, warmup=1, ema_decay=0.995),
    description="2-D densities, exact logdet (the series above 16 dimensions), tuned for "
    "minutes on CPU",
    default_for=("vector",),
)
register_preset(
    "toy2d-paper",
    "residual-flow-vector",
    VectorFlowConfig(
        dim=2,
        n_blocks=100,
        hidden=(128, 128, 128, 128),
        coeff=0.9,
        actnorm=False,
        estimator=_EXACT,
    ),
    # compiled: faster than the general path once the first step's compilation is repaid
    # (docs/RESULTS.md §24)
    train=TrainConfig(lr=1e-3, batch_size=500, weight_decay=1e-5, compile=True),
    description="the authors' 2-D default (100 blocks of 4x128; 5,018,500 parameters, their "
    "count); differs from their train_toy.py: exact logdet in training (theirs: 2 exact terms "
    "+ a geometric roulette, exact only at evaluation), adaptive power iteration (theirs: 5 per "
    "step; power_iterations=5), last layer not scaled down at init (theirs: /1000), AdamW "
    "(0.9, 0.99) with decoupled weight decay, warm-up, clipping and EMA (theirs: Adam (0.9, "
    "0.999), none of these applied; grad_clip=0 turns clipping off)",
)
