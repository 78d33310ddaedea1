"""Glow (Kingma & Dhariwal, NeurIPS 2018): configs, builders, presets.

Registered as ``glow`` (images) and ``glow-vector`` (2-D and tabular data). Each level
is ``squeeze -> K steps -> split`` (no split after the last level), one step being
``ActNorm -> invertible 1x1 convolution (LU or full) -> affine (scale
sigmoid(h + 2)) or additive coupling`` whose network's last convolution starts at
zero (:mod:`resflow.nets.glow`). The split's factored half has a Gaussian prior
computed from the kept half by a zero-initialised convolution; the top prior is a
learned diagonal Gaussian (class-conditional with ``n_classes``, when the coupling
networks also see the one-hot label). Data: ``x / L - 1/2`` after uniform
dequantization (no logit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from resflow.config import Config, param
from resflow.distributions import make_base
from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import ChannelMask, Coupling
from resflow.layers.multiscale import ConditionalPrior
from resflow.layers.transformers import Additive, Affine, Transformer
from resflow.models.dequantization import DequantizationConfig, build_dequantizer
from resflow.models.multiscale import count_scales, multiscale
from resflow.models.registry import register_model, register_preset
from resflow.nets.conditioners import MLP
from resflow.nets.glow import GlowNet, ZeroConv2d
from resflow.preprocess import image_preprocessing
from resflow.train_config import TrainConfig

MAX_WIDTH = 65536
Kind = Literal["affine", "additive"]


def _transformer(kind: Kind) -> Transformer:
    return Affine("sigmoid") if kind == "affine" else Additive()


@dataclass
class GlowConfig(Config):
    """Multi-scale Glow for images (defaults: the paper's CIFAR-10 model, K=32, L=3)."""

    image_shape: tuple[int, int, int] = param((3, 32, 32), ge=1, le=8192, help="(C, H, W)")
    levels: int = param(256, ge=2, le=65536, help="quantization levels of the data")
    n_levels: int = param(3, ge=1, le=16, help="levels L (squeeze, K steps, split)")
    depth: int = param(32, ge=1, le=1024, help="steps K per level")
    hidden: int = param(512, ge=1, le=MAX_WIDTH, help="hidden channels of the coupling nets")
    coupling: Kind = param("affine", help="affine (sigmoid scale) or additive coupling")
    lu: bool = param(True, help="LU-parameterized 1x1 convolutions")
    learn_top: bool = param(True, help="learned diagonal Gaussian top prior")
    horizontal_flip: bool = param(False, help="random horizontal flips in training")
    n_classes: int = param(0, ge=0, le=100_000, help="classes (0: unconditional)")
    dequantization: DequantizationConfig = field(default_factory=DequantizationConfig)


@dataclass
class GlowVectorConfig(Config):
    """Glow for vectors: ``ActNorm -> invertible linear map -> coupling``, K times."""

    dim: int = param(2, ge=2, le=1_000_000, help="data dimension")
    depth: int = param(8, ge=1, le=1024, help="steps")
    hidden: tuple[int, ...] = param((64, 64), ge=1, le=MAX_WIDTH, help="widths of the MLPs")
    coupling: Kind = param("affine", help="affine (sigmoid scale) or additive coupling")
    lu: bool = param(True, help="LU-parameterized invertible linear maps")


def glow_step(shape: Shape, kind: Kind, lu: bool, net: partial) -> list[FlowLayer]:  # type: ignore[type-arg]
    """One step of flow: ``ActNorm -> 1x1 conv -> coupling`` on examples of ``shape``."""
    c = shape[0]
    coupling = Coupling.build(shape, ChannelMask(), _transformer(kind), net)
    return [ActNorm(c), InvertibleConv1x1(c, lu), coupling]


def build_glow(cfg: GlowConfig) -> Flow:
    _, h, w = cfg.image_shape
    if h % 2 or w % 2:
        raise ValueError(f"Glow squeezes first: it needs an even image size, got {h}x{w}")
    n = count_scales(cfg.image_shape, cfg.n_levels, squeeze_first=True, min_size=2)
    net = partial(GlowNet, hidden=cfg.hidden, context_channels=cfg.n_classes)

    def step(i: int, shape: Shape) -> list[FlowLayer]:
        return [
            layer for _ in range(cfg.depth) for layer in glow_step(shape, cfg.coupling, cfg.lu, net)
        ]

    def prior(i: int, half: Shape, kept: Shape) -> ConditionalPrior:
        return ConditionalPrior(ZeroConv2d(kept[0], 2 * half[0]))

    c = cfg.image_shape[0]
    layers = image_preprocessing(
        cfg.levels,
        None,
        cfg.horizontal_flip,
        build_dequantizer(cfg.dequantization, cfg.levels, cfg.image_shape),
        normalize=((0.5,) * c, (1.0,) * c),
    )
    layers += multiscale(
        cfg.image_shape,
        n,
        step,
        squeeze_first=True,
        factor_out=True,
        split_first=True,
        prior=prior,
    )
    body = Sequential(layers)
    latent = body.output_shape(cfg.image_shape)
    return Flow(
        body,
        cfg.image_shape,
        base=make_base(latent, "diagonal" if cfg.learn_top else "standard", cfg.n_classes),
        levels=cfg.levels,
        n_classes=cfg.n_classes or None,
    )


def build_glow_vector(cfg: GlowVectorConfig) -> Flow:
    net = partial(MLP, hidden=cfg.hidden)
    layers = [
        layer
        for _ in range(cfg.depth)
        for layer in glow_step((cfg.dim,), cfg.coupling, cfg.lu, net)
    ]
    return Flow(Sequential(layers), (cfg.dim,))


register_model(
    "glow",
    config=GlowConfig,
    build=build_glow,
    kind="image",
    description="Glow for images (Kingma & Dhariwal 2018)",
)
register_model(
    "glow-vector",
    config=GlowVectorConfig,
    build=build_glow_vector,
    kind="vector",
    family="glow",
    description="Glow for vectors and 2-D data",
)

# ---- presets -------------------------------------------------------------------------------
register_preset(
    "glow-cifar10",
    "glow",
    GlowConfig(image_shape=(3, 32, 32), n_levels=3, depth=32, hidden=512, horizontal_flip=True),
    train=TrainConfig(lr=1e-3, batch_size=64, weight_decay=0.0, warmup=2000, grad_clip=50.0),
    description="CIFAR-10, paper architecture (K=32, L=3, 512 channels, affine, LU)",
)
_SMALL = TrainConfig(lr=1e-3, batch_size=64, weight_decay=0.0, warmup=100, grad_clip=50.0)
register_preset(
    "glow-digits",
    "glow",
    GlowConfig(image_shape=(1, 8, 8), levels=17, n_levels=2, depth=8, hidden=64),
    train=_SMALL,
    description="8x8 digits in a few minutes on CPU",
    default_for=("digits",),
)
register_preset(
    "glow-mnist",
    "glow",
    GlowConfig(image_shape=(1, 28, 28), levels=256, n_levels=2, depth=8, hidden=64),
    train=_SMALL,
    description="MNIST-sized images on CPU",
    default_for=("mnist", "fashion-mnist"),
)
register_preset(
    "glow-toy2d",
    "glow-vector",
    GlowVectorConfig(dim=2, depth=8, hidden=(64, 64)),
    train=TrainConfig(lr=2e-3, batch_size=500, weight_decay=0.0, warmup=50, ema_decay=0.995),
    description="2-D densities in minutes on CPU",
    default_for=("vector",),
)
