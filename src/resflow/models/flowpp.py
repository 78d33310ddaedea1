"""Flow++ (Ho, Chen, Srinivas, Duan & Abbeel, ICML 2019): config, builder, presets.

Registered as ``flowpp`` (images). The CIFAR-10 architecture of the authors' code
(``flows/run_cifar.py``), data -> latent:

    variational dequantizer -> logit(0.05 + 0.9 y)
    -> 4 x step (ColumnMask)                              at 32 x 32 x 3
    -> squeeze -> 2 x step (ChannelMask) -> 3 x step (ColumnMask)   at 16 x 16 x 12
    -> flatten, standard normal prior (no factor-out),

one step being ``ElementActNorm -> a 1x1 convolution per half -> logistic-mixture CDF
coupling`` whose network has gated convolutions, self-attention and layer norm
(:mod:`resflow.nets.flowpp`); the masks alternate between the steps (the code's
``TupleFlip``). The dequantizer is the same kind of flow on noise, conditioned on
features of the data (:mod:`resflow.models.dequantization`). With the default
(paper) config the model has **31,443,440** parameters, the count in the authors'
code; the ablation presets have theirs too (uniform dequantization, 104 channels:
32,324,408; affine coupling, 108 channels: 32,045,708; no attention, a pointwise
gate instead: 31,443,440).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from resflow.config import ConfigError, param
from resflow.distributions import make_base
from resflow.flow import Flow
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.coupling import ChannelMask, ColumnMask
from resflow.layers.multiscale import Flatten
from resflow.layers.squeeze import Squeeze
from resflow.models.configs import MAX_WIDTH, ClassConditionalConfig, ImageModelConfig
from resflow.models.dequantization import (
    CouplingKind,
    DequantizationConfig,
    build_dequantizer,
    coupling_transformer,
    flowpp_step,
)
from resflow.models.registry import register_model, register_preset
from resflow.preprocess import image_preprocessing
from resflow.train_config import TrainConfig


def _paper_dequantizer() -> DequantizationConfig:
    return DequantizationConfig(
        kind="variational", couplings=4, hidden=96, blocks=2, components=32, dropout=0.2
    )


@dataclass
class FlowppConfig(ClassConditionalConfig, ImageModelConfig):
    """Flow++ for images (defaults: the paper's CIFAR-10 model)."""

    couplings: tuple[int, ...] = param(
        (4, 2, 3),
        ge=0,
        le=64,
        help="steps: column-split before the squeeze, channel-split and column-split after",
    )
    hidden: int = param(96, ge=1, le=MAX_WIDTH, help="channels of the coupling nets")
    blocks: int = param(10, ge=1, le=64, help="blocks per coupling net")
    components: int = param(32, ge=1, le=1024, help="logistic mixture components")
    coupling: CouplingKind = param("mixlog", help="logistic-mixture CDF or affine couplings")
    heads: int = param(4, ge=1, le=64, help="attention heads")
    attention: bool = param(True, help="self-attention in the coupling nets")
    dropout: float = param(0.2, ge=0, lt=1, help="dropout in the coupling nets")
    logit_alpha: float = param(0.05, gt=0, lt=0.5, help="alpha of the logit transform")
    dequantization: DequantizationConfig = field(default_factory=_paper_dequantizer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.couplings) != 3:
            raise ConfigError(
                f"couplings: expected 3 numbers (before the squeeze, channel-split, "
                f"column-split), got {self.couplings}"
            )


def build_flowpp(cfg: FlowppConfig) -> Flow:
    c, h, w = cfg.image_shape
    n1, n2, n3 = cfg.couplings
    if h % 2 or w % 2 or (n3 and w % 4):
        raise ValueError(
            f"Flow++ splits columns and squeezes: it needs an even height and a width "
            f"divisible by {4 if n3 else 2}, got {h}x{w}"
        )

    def steps(shape: tuple[int, int, int], n: int, column: bool) -> list[FlowLayer]:
        out: list[FlowLayer] = []
        for j in range(n):
            mask = ColumnMask(j % 2 == 1) if column else ChannelMask(j % 2 == 1)
            out += flowpp_step(
                shape,
                mask,
                coupling_transformer(cfg.coupling, cfg.components),
                cfg.hidden,
                cfg.blocks,
                cfg.heads,
                cfg.attention,
                cfg.dropout,
                context_channels=cfg.n_classes,
            )
        return out

    dequantizer = build_dequantizer(cfg.dequantization, cfg.levels, cfg.image_shape)
    layers = image_preprocessing(cfg.levels, cfg.logit_alpha, cfg.horizontal_flip, dequantizer)
    layers += steps(cfg.image_shape, n1, column=True)
    squeezed = (4 * c, h // 2, w // 2)
    layers += [Squeeze(2), *steps(squeezed, n2, column=False), *steps(squeezed, n3, column=True)]
    layers.append(Flatten(squeezed))
    body = Sequential(layers)
    latent = body.output_shape(cfg.image_shape)
    return Flow(
        body,
        cfg.image_shape,
        base=make_base(latent, n_classes=cfg.n_classes),
        levels=cfg.levels,
        n_classes=cfg.n_classes or None,
    )


register_model(
    "flowpp",
    config=FlowppConfig,
    build=build_flowpp,
    kind="image",
    description="Flow++ for images (Ho et al. 2019)",
)

# ---- presets: the paper's CIFAR-10 model and its ablations (Table 3) -----------------------
_PAPER_TRAIN = TrainConfig(
    lr=3e-4, batch_size=64, weight_decay=0.0, warmup=2000, grad_clip=1.0, ema_decay=0.999
)
_FLOWPP_DIFFERENCES = (
    "; differs from the authors' code (aravindsrinivas/flowpp): AdamW (0.9, 0.99) with no "
    "decay (theirs: Adam (0.9, 0.999)), EMA decay ramped up to 0.999 (theirs: 0.999 from the "
    "start), PyTorch's default initialisation with zero output convolutions (theirs: every "
    "convolution initialised from a batch of 128 images, gates and outputs at scale 0.1)"
)
register_preset(
    "flowpp-cifar10",
    "flowpp",
    FlowppConfig(),
    train=_PAPER_TRAIN,
    description="CIFAR-10, the authors' architecture (31,443,440 parameters)" + _FLOWPP_DIFFERENCES,
)
register_preset(
    "flowpp-cifar10-uniform",
    "flowpp",
    FlowppConfig(hidden=104, dequantization=DequantizationConfig(kind="uniform")),
    train=_PAPER_TRAIN,
    description="ablation: uniform dequantization (104 channels, 32,324,408 parameters)"
    + _FLOWPP_DIFFERENCES,
)
register_preset(
    "flowpp-cifar10-affine",
    "flowpp",
    FlowppConfig(
        hidden=108,
        coupling="affine",
        dequantization=DequantizationConfig(
            kind="variational", hidden=108, blocks=2, coupling="affine", dropout=0.2
        ),
    ),
    train=_PAPER_TRAIN,
    description="ablation: affine instead of logistic-mixture couplings (108 channels, "
    "32,045,708 parameters)" + _FLOWPP_DIFFERENCES,
)
register_preset(
    "flowpp-cifar10-noattn",
    "flowpp",
    FlowppConfig(
        attention=False,
        dequantization=DequantizationConfig(
            kind="variational", hidden=96, blocks=2, components=32, attention=False, dropout=0.2
        ),
    ),
    train=_PAPER_TRAIN,
    description="ablation: no self-attention (a pointwise gate, same parameter count)"
    + _FLOWPP_DIFFERENCES,
)

# ---- small presets that train in minutes on CPU ----------------------------------------------
_SMALL_DEQ = DequantizationConfig(
    kind="variational", couplings=2, hidden=16, blocks=1, components=4, context_hidden=16,
    context_blocks=1,
)  # fmt: skip
_SMALL_TRAIN = TrainConfig(lr=2e-3, batch_size=64, weight_decay=0.0, warmup=100, grad_clip=1.0)
register_preset(
    "flowpp-digits",
    "flowpp",
    FlowppConfig(
        image_shape=(1, 8, 8),
        levels=17,
        couplings=(2, 2, 2),
        hidden=32,
        blocks=2,
        components=8,
        dropout=0.0,
        dequantization=_SMALL_DEQ,
    ),
    train=_SMALL_TRAIN,
    description="8x8 digits in a few minutes on CPU",
    default_for=("digits",),
)
register_preset(
    "flowpp-mnist",
    "flowpp",
    FlowppConfig(
        image_shape=(1, 28, 28),
        levels=256,
        couplings=(2, 2, 2),
        hidden=32,
        blocks=1,
        components=8,
        dropout=0.0,
        dequantization=_SMALL_DEQ,
    ),
    train=_SMALL_TRAIN,
    description="MNIST-sized images on CPU",
    default_for=("mnist", "fashion-mnist"),
)
