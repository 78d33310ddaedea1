"""Neural spline flows on images (Durkan et al. 2019, RQ-NSF (C)): Glow's multi-scale
architecture with rational-quadratic spline couplings.

``dequantize -> x - 1/2 -> [squeeze -> steps x (ActNorm -> 1x1 conv (LU) -> spline
coupling)] per level [-> factor out half] -> flatten``, the couplings alternating which
half of the channels they transform, each conditioned by a residual conv net with batch
norm and dropout; a standard normal base.

>>> import torch
>>> from resflow.models import build_model
>>> cfg = NSFImageConfig(image_shape=(1, 4, 4), levels=17, n_levels=1, steps=1,
...                      hidden=8, blocks=1, bins=4)
>>> build_model(cfg).log_prob(torch.randint(0, 17, (3, 1, 4, 4))).shape
torch.Size([3])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from resflow.config import param
from resflow.distributions import make_base
from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import ChannelMask, Coupling
from resflow.layers.splines import RationalQuadraticSpline
from resflow.models.configs import MAX_WIDTH, ClassConditionalConfig, ImageModelConfig
from resflow.models.dequantization import centred_input
from resflow.models.multiscale import count_scales, multiscale
from resflow.models.registry import register_model, register_preset
from resflow.nets.conditioners import ResidualConvNet
from resflow.train_config import TrainConfig


@dataclass
class NSFImageConfig(ClassConditionalConfig, ImageModelConfig):
    """RQ-NSF (C) for images (defaults: the paper's 8-bit CIFAR-10 model)."""

    n_levels: int = param(3, ge=1, le=16, help="levels (squeeze, steps[, split])")
    steps: int = param(7, ge=1, le=256, help="steps of flow per level")
    hidden: int = param(96, ge=1, le=MAX_WIDTH, help="channels of the coupling nets")
    blocks: int = param(3, ge=1, le=64, help="residual blocks per coupling net")
    dropout: float = param(0.2, ge=0, lt=1, help="dropout in the coupling nets")
    bins: int = param(4, ge=1, le=256, help="spline bins K")
    bound: float = param(3.0, gt=0, le=1e6, help="splines on [-B, B], identity outside")
    param_bound: float = param(
        3.0, ge=0, le=1e6, help="soft clamp of the spline parameters (0: none, the paper)"
    )
    multi_scale: bool = param(False, help="factor out half the channels after each level")


def build_nsf_image(cfg: NSFImageConfig) -> Flow:
    _, h, w = cfg.image_shape
    if h % 2 or w % 2:
        raise ValueError(f"NSF squeezes first: it needs an even image size, got {h}x{w}")
    n = count_scales(cfg.image_shape, cfg.n_levels, squeeze_first=True, min_size=2)
    net = partial(ResidualConvNet, hidden=cfg.hidden, blocks=cfg.blocks, dropout=cfg.dropout,
                  context_channels=cfg.n_classes)  # fmt: skip

    def step(i: int, shape: Shape) -> list[FlowLayer]:
        layers: list[FlowLayer] = []
        for j in range(cfg.steps):
            spline = RationalQuadraticSpline(cfg.bins, cfg.bound, clamp=cfg.param_bound or None)
            coupling = Coupling.build(shape, ChannelMask(reverse=j % 2 == 1), spline, net)
            layers += [ActNorm(shape[0]), InvertibleConv1x1(shape[0], lu=True), coupling]
        return layers

    layers = centred_input(cfg)
    layers += multiscale(cfg.image_shape, n, step, squeeze_first=True,
                         factor_out=cfg.multi_scale, split_first=True)  # fmt: skip
    body = Sequential(layers)
    latent = body.output_shape(cfg.image_shape)
    return Flow(body, cfg.image_shape, base=make_base(latent, "standard", cfg.n_classes),
                levels=cfg.levels, n_classes=cfg.n_classes or None)  # fmt: skip


register_model(
    "nsf-image",
    config=NSFImageConfig,
    build=build_nsf_image,
    kind="image",
    family="nsf",
    description="neural spline flow for images, RQ-NSF (C) (Durkan et al. 2019)",
)
register_preset(
    "nsf-cifar10",
    "nsf-image",
    NSFImageConfig(image_shape=(3, 32, 32), levels=256),
    train=TrainConfig(
        steps=200_000,
        lr=5e-4,
        batch_size=512,
        weight_decay=0.0,
        warmup=1000,
        grad_clip=5.0,
        eval_every=5000,
    ),  # fmt: skip
    description="CIFAR-10, the paper's 8-bit RQ-NSF (C) (3 levels of 7 steps, 96 channels, 3 "
    "residual blocks with batch norm, dropout 0.2, 4 bins on [-3, 3], no factoring out; "
    "3.38 bits/dim in the paper; 12,752,082 parameters); differs from the authors' code "
    "(bayesiains/nsf): the spline parameters soft-clamped to 3 (param_bound=0 for their "
    "map), AdamW with a warm-up, clipping at 5 and EMA (theirs: Adam 5e-4 with cosine "
    "annealing)",
)
register_preset(
    "nsf-digits",
    "nsf-image",
    NSFImageConfig(
        image_shape=(1, 8, 8),
        levels=17,
        n_levels=2,
        steps=3,
        hidden=32,
        blocks=1,
        dropout=0.0,
        bins=8,
    ),  # fmt: skip
    train=TrainConfig(
        steps=2000, lr=1e-3, batch_size=64, weight_decay=0.0, warmup=100, eval_every=250
    ),  # fmt: skip
    description="8x8 digits in a few minutes on CPU",
    default_for=("digits",),
)
