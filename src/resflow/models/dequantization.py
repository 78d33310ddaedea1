"""The dequantizer of every image model: uniform (the default) or Flow++'s variational
dequantizer (Ho et al. 2019, §3.1), chosen by one config field.

Every image family's config has a ``dequantization: DequantizationConfig`` field and
its builder passes :func:`build_dequantizer` to
:func:`~resflow.preprocess.image_preprocessing`; ``--dequantization variational`` (or
``--set dequantization.kind=variational``) switches any of them to

    eps ~ N(0, I) -> couplings x [ElementActNorm -> per-half 1x1 conv ->
    logistic-mixture coupling (ColumnMask, Flow++ net with the data's features as
    context)] -> sigmoid -> u,

the features being :class:`~resflow.nets.flowpp.ContextProcessor` on the data split
by columns (Flow++'s CIFAR-10 dequantizer: 4 couplings, 96 channels, 2 blocks, 32
components; features 32 channels from 3 gated convolutions). :func:`flowpp_step` is
also the step of the Flow++ model (:mod:`resflow.models.flowpp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from resflow.config import Config, param
from resflow.layers.actnorm import ElementActNorm
from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import ChannelMask, ColumnMask, Coupling
from resflow.layers.halves import Halves
from resflow.layers.logistic_mixture import LogisticMixtureCDF
from resflow.layers.transformers import Affine, Transformer
from resflow.models.limits import MAX_WIDTH
from resflow.nets.flowpp import ContextProcessor, FlowppNet
from resflow.preprocess import (
    Dequantizer,
    UniformDequantizer,
    VariationalDequantizer,
    image_preprocessing,
)

CouplingKind = Literal["mixlog", "affine"]


@dataclass
class DequantizationConfig(Config):
    """How integer data become continuous: uniform noise, or a learned ``q(u | x)``."""

    kind: Literal["uniform", "variational"] = param(
        "uniform", help="uniform or variational (Flow++) dequantization"
    )
    couplings: int = param(4, ge=1, le=64, help="couplings of the noise flow")
    hidden: int = param(32, ge=1, le=MAX_WIDTH, help="channels of its coupling nets")
    blocks: int = param(2, ge=1, le=64, help="blocks per coupling net")
    components: int = param(8, ge=1, le=1024, help="logistic mixture components")
    coupling: CouplingKind = param("mixlog", help="logistic-mixture CDF or affine couplings")
    heads: int = param(4, ge=1, le=64, help="attention heads")
    attention: bool = param(True, help="self-attention in the coupling nets")
    context_hidden: int = param(32, ge=1, le=MAX_WIDTH, help="channels of the data features")
    context_blocks: int = param(3, ge=0, le=64, help="gated convolutions of the features")
    dropout: float = param(0.0, ge=0, lt=1, help="dropout in the nets")
    base: Literal["normal", "logistic"] = param("normal", help="base density of the noise")


def coupling_transformer(kind: CouplingKind, components: int) -> Transformer:
    """Flow++'s logistic-mixture CDF, or its affine ablation ``x exp(tanh(h)) + t``."""
    return LogisticMixtureCDF(components) if kind == "mixlog" else Affine("tanh")


def flowpp_step(
    shape: Shape,
    mask: ColumnMask | ChannelMask,
    transformer: Transformer,
    hidden: int,
    blocks: int,
    heads: int,
    attention: bool,
    dropout: float,
    context_channels: int = 0,
) -> list[FlowLayer]:
    """One Flow++ step on examples of ``shape``: ``ElementActNorm -> 1x1 conv on each
    half -> coupling`` (the paper's ``Norm, Pointwise, MixLogisticAttnCoupling``; the
    1x1 convolutions are full matrices, one per half)."""
    c_a, c_b = mask.channels(tuple(shape))
    _, h, w = shape
    size = (h, w // 2) if isinstance(mask, ColumnMask) else (h, w)
    net = FlowppNet(
        c_a,
        transformer.n_params * c_b,
        size,
        hidden=hidden,
        blocks=blocks,
        heads=heads,
        attention=attention,
        dropout=dropout,
        context_channels=context_channels,
    )
    pointwise = Halves(mask, InvertibleConv1x1(c_a, lu=False), InvertibleConv1x1(c_b, lu=False))
    return [ElementActNorm(tuple(shape)), pointwise, Coupling(mask, net, transformer)]


class ColumnConcat(nn.Module):
    """``[B, C, H, W] -> [B, 2C, H, W/2]``: even columns, then odd ones, as channels."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x[..., 0::2], x[..., 1::2]], 1)


def build_dequantizer(
    cfg: DequantizationConfig, levels: int, image_shape: tuple[int, int, int]
) -> Dequantizer:
    """The dequantizer ``cfg`` describes for images of ``image_shape``."""
    if cfg.kind == "uniform":
        return UniformDequantizer(levels)
    c, h, w = image_shape
    if w % 2:
        raise ValueError(
            f"variational dequantization splits columns: it needs an even width, got {w}"
        )
    layers: list[FlowLayer] = []
    for j in range(cfg.couplings):
        layers += flowpp_step(
            image_shape,
            ColumnMask(j % 2 == 1),
            coupling_transformer(cfg.coupling, cfg.components),
            cfg.hidden,
            cfg.blocks,
            cfg.heads,
            cfg.attention,
            cfg.dropout,
            context_channels=cfg.context_hidden,
        )
    processor = nn.Sequential(
        ColumnConcat(), ContextProcessor(2 * c, cfg.context_hidden, cfg.context_blocks, cfg.dropout)
    )
    return VariationalDequantizer(levels, Sequential(layers), processor, cfg.base)


def centred_input(cfg: Any) -> list[FlowLayer]:
    """Glow's input for an image config: the config's dequantizer, optional flips, then
    ``x - 1/2`` on ``[0, 1)`` (no logit)."""
    c = cfg.image_shape[0]
    return image_preprocessing(
        cfg.levels,
        None,
        cfg.horizontal_flip,
        build_dequantizer(cfg.dequantization, cfg.levels, cfg.image_shape),
        normalize=((0.5,) * c, (1.0,) * c),
    )
