"""Glow (Kingma & Dhariwal, NeurIPS 2018): configs, builders, presets.

Registered as ``glow`` (images) and ``glow-vector`` (2-D and tabular data). Each level
is ``squeeze -> K steps -> split`` (no split after the last level), one step being
``ActNorm -> invertible 1x1 convolution (LU or full) -> affine (scale
sigmoid(h + 2)) or additive coupling`` whose network's last convolution starts at
zero (:mod:`resflow.nets.glow`). The split's factored half has a Gaussian prior
computed from the kept half by a zero-initialised convolution. The top prior:

* ``top_prior="authors"`` (the paper presets; the authors' ``learntop`` and ``ycond``,
  openai/glow): :class:`GlowTopPrior`, a Gaussian on the *top* latent only, its mean and
  log-scale a zero-initialised convolution of zeros with the edge channel (so per
  channel, varying only near the border) plus, with ``n_classes``, a zero-initialised
  linear map of the one-hot label (per channel); the factored halves keep their split
  priors and nothing else;
* ``top_prior="whole-latent"`` (the default, so that runs saved before the field
  existed reload unchanged): a learned diagonal Gaussian over every element of the flat
  latent, factored halves included (class-conditional with ``n_classes``: a mean and
  scale per class and element).

With ``n_classes`` the coupling networks also see the one-hot label unless
``label_in_couplings`` is false (the paper presets: the authors' code conditions only
the top prior). Data: ``x / L - 1/2`` after uniform
dequantization (no logit).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from resflow.config import param, replace
from resflow.distributions import StandardNormal, make_base
from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import ChannelMask, Coupling
from resflow.layers.multiscale import ConditionalPrior, Flatten
from resflow.layers.transformers import Additive, Affine, Transformer
from resflow.models.configs import (
    MAX_WIDTH,
    ClassConditionalConfig,
    ImageModelConfig,
    VectorModelConfig,
)
from resflow.models.dequantization import centred_input
from resflow.models.multiscale import count_scales, flatten_end, multiscale
from resflow.models.registry import register_model, register_preset
from resflow.nets.conditioners import MLP
from resflow.nets.glow import GlowNet, ZeroConv2d
from resflow.train_config import TrainConfig

Kind = Literal["affine", "additive"]


def _transformer(kind: Kind) -> Transformer:
    return Affine("sigmoid") if kind == "affine" else Additive()


@dataclass
class GlowConfig(ClassConditionalConfig, ImageModelConfig):
    """Multi-scale Glow for images (defaults: the paper's CIFAR-10 model, K=32, L=3)."""

    n_levels: int = param(3, ge=1, le=16, help="levels L (squeeze, K steps, split)")
    depth: int = param(32, ge=1, le=1024, help="steps K per level")
    hidden: int = param(512, ge=1, le=MAX_WIDTH, help="hidden channels of the coupling nets")
    coupling: Kind = param("affine", help="affine (sigmoid scale) or additive coupling")
    lu: bool = param(True, help="LU-parameterized 1x1 convolutions")
    learn_top: bool = param(True, help="learned top prior")
    top_prior: Literal["whole-latent", "authors"] = param(
        "whole-latent",
        help="what the learned (and class-conditional) prior covers: the top latent only, "
        "per channel, as in the authors' code, or every element of the flat latent",
    )
    label_in_couplings: bool = param(
        True,
        help="class-conditional: the coupling nets also see the label (the authors' code: "
        "only the top prior does)",
    )
    edge_bias: bool = param(
        False, help="the 3x3 convolutions see an edge channel (the authors' code)"
    )


@dataclass
class GlowVectorConfig(VectorModelConfig):
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


class GlowTopPrior(FlowLayer):
    """The Glow authors' top prior as a flow on the top latent ``z`` of shape ``(C, H, W)``:
    ``eps = (z - mu) exp(-log_sigma)`` into ``N(0, I)``, logdet ``-sum log_sigma``.

    ``[mu, log_sigma]`` (``2C`` channels) is the sum of

    * with ``learn``: ``ZeroConv2d(2C, 2C, edge_bias=True)`` applied to zeros, i.e. a
      per-channel constant plus a learned function of where the 3x3 window meets the
      border (only the edge channel's weights, the bias and the scale can move; the other
      weights multiply zeros and are kept so that the count is the authors');
    * with ``n_classes``: ``(W y + b) exp(3 s)`` for the one-hot label ``y`` (zero
      initialised), per channel.

    Both start at zero: the standard normal.
    """

    def __init__(self, shape: Shape, learn: bool = True, n_classes: int = 0) -> None:
        super().__init__()
        c, h, w = shape
        self.shape = (c, h, w)
        self.n_classes = n_classes
        self.conv = ZeroConv2d(2 * c, 2 * c, edge_bias=True) if learn else None
        self.label: nn.Linear | None = None
        if n_classes:
            self.label = nn.Linear(n_classes, 2 * c)
            nn.init.zeros_(self.label.weight)
            nn.init.zeros_(self.label.bias)
            self.label_log_scale = nn.Parameter(torch.zeros(2 * c))

    def params(self, like: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        c, h, w = self.shape
        out = like.new_zeros(1, 2 * c, h, w)
        if self.conv is not None:
            out = self.conv(out)
        if self.label is not None:
            if context is None or context.shape != (like.shape[0], self.n_classes):
                got = "none" if context is None else tuple(context.shape)
                raise ValueError(
                    f"the class-conditional top prior needs one-hot labels "
                    f"[{like.shape[0]}, {self.n_classes}], got {got}"
                )
            y = self.label(context.to(like.dtype)) * torch.exp(3.0 * self.label_log_scale)
            out = out + y.view(-1, 2 * c, 1, 1)
        mu, log_sigma = out.chunk(2, 1)
        return mu, log_sigma

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.params(x, context)
        eps = (x - mu) * torch.exp(-log_sigma)
        return eps, -log_sigma.expand_as(x).flatten(1).sum(1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        mu, log_sigma = self.params(y, context)
        return y * torch.exp(log_sigma) + mu

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.params(y, context)
        return y * torch.exp(log_sigma) + mu, log_sigma.expand_as(y).flatten(1).sum(1)


def build_glow(cfg: GlowConfig) -> Flow:
    _, h, w = cfg.image_shape
    if h % 2 or w % 2:
        raise ValueError(f"Glow squeezes first: it needs an even image size, got {h}x{w}")
    n = count_scales(cfg.image_shape, cfg.n_levels, squeeze_first=True, min_size=2)
    net = partial(
        GlowNet,
        hidden=cfg.hidden,
        context_channels=cfg.n_classes if cfg.label_in_couplings else 0,
        edge_bias=cfg.edge_bias,
    )
    authors_prior = cfg.top_prior == "authors"

    def step(i: int, shape: Shape) -> list[FlowLayer]:
        return [
            layer for _ in range(cfg.depth) for layer in glow_step(shape, cfg.coupling, cfg.lu, net)
        ]

    def prior(i: int, half: Shape, kept: Shape) -> ConditionalPrior:
        return ConditionalPrior(ZeroConv2d(kept[0], 2 * half[0], edge_bias=cfg.edge_bias))

    def final(shape: Shape) -> list[FlowLayer]:
        if not authors_prior or not (cfg.learn_top or cfg.n_classes):
            return flatten_end(shape)
        return [GlowTopPrior(shape, cfg.learn_top, cfg.n_classes), Flatten(shape)]

    layers = centred_input(cfg)
    layers += multiscale(
        cfg.image_shape,
        n,
        step,
        squeeze_first=True,
        factor_out=True,
        split_first=True,
        prior=prior,
        final=final,
    )
    body = Sequential(layers)
    latent = body.output_shape(cfg.image_shape)
    if authors_prior:
        base: nn.Module = StandardNormal(latent)
    else:
        base = make_base(latent, "diagonal" if cfg.learn_top else "standard", cfg.n_classes)
    return Flow(
        body,
        cfg.image_shape,
        base=base,
        levels=cfg.levels,
        n_classes=cfg.n_classes or None,
    )


def build_glow_vector(cfg: GlowVectorConfig) -> Flow:
    net = partial(MLP, hidden=cfg.hidden, context_features=cfg.context_features)
    layers = [
        layer
        for _ in range(cfg.depth)
        for layer in glow_step((cfg.dim,), cfg.coupling, cfg.lu, net)
    ]
    return Flow(Sequential(layers), (cfg.dim,), context_features=cfg.context_features)


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

# ---- presets: the paper's models as the authors' code (openai/glow) builds them ---------------
_DIFFERENCES = (
    "; as the authors' code: full 1x1 convolutions (the paper's LU form: lu=true), split "
    "priors from the kept half, the label (with --conditional) in the top prior only; "
    "differences: the factored half is the first half of the channels (theirs: the second), "
    "means and log-scales are the first and second halves of the nets' outputs (theirs: "
    "interleaved); AdamW with "
    "Polyak-style weight averaging as resflow's EMA (theirs: Adamax, Adam's second-moment "
    "decay and the averaging both 1 - 1/(steps per epoch), 10 warm-up epochs; their global "
    "batch: 8 processes x 64)"
)


def _authors_train(steps_per_epoch: int) -> TrainConfig:
    """The authors' optimizer settings as resflow expresses them: lr 1e-3, batch 8 x 64,
    second-moment decay and weight averaging ``1 - 1/(steps per epoch)``, 10 warm-up
    epochs, no clipping, no weight decay."""
    beta = round(1 - 1 / steps_per_epoch, 4)
    return TrainConfig(
        lr=1e-3, batch_size=512, weight_decay=0.0, betas=(0.9, beta), ema_decay=beta,
        warmup=10 * steps_per_epoch, grad_clip=1e9,
    )  # fmt: skip


_GLOW = GlowConfig(lu=False, top_prior="authors", edge_bias=True, label_in_couplings=False)
register_preset(
    "glow-cifar10",
    "glow",
    replace(_GLOW, image_shape=(3, 32, 32), n_levels=3, depth=32, hidden=512, horizontal_flip=True),
    train=_authors_train(98),  # 50,000 images / 512
    description="CIFAR-10, paper architecture (K=32, L=3, 512 channels, affine; 44,603,604 "
    "parameters, the authors' count), learned prior on the top latent only, edge-aware convolutions"
    + _DIFFERENCES,
)
_IMAGENET_TRAIN = _authors_train(2502)  # 1,281,167 images / 512
register_preset(
    "glow-imagenet32",
    "glow",
    replace(_GLOW, image_shape=(3, 32, 32), n_levels=3, depth=48, hidden=512),
    train=_IMAGENET_TRAIN,
    description="ImageNet 32x32, the authors' command (K=48, L=3, 512 channels, affine; "
    "66,861,588 parameters, the authors' count), learned prior on the top latent only"
    + _DIFFERENCES,
)
register_preset(
    "glow-imagenet64",
    "glow",
    replace(_GLOW, image_shape=(3, 64, 64), n_levels=4, depth=48, hidden=512),
    train=_IMAGENET_TRAIN,
    description="ImageNet 64x64, the authors' command (K=48, L=4, 512 channels, affine; "
    "112,377,540 parameters, the authors' count), learned prior on the top latent only"
    + _DIFFERENCES,
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
