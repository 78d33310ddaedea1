"""DenseFlow (Grcić, Grubišić & Šegvić, NeurIPS 2021): config, builder, presets.

Registered as ``denseflow`` (images). DenseFlow-L-k, data -> latent:

    dequantizer -> x - 1/2 -> squeeze
    -> block 0 -> squeeze -> factor out half -> block 1 -> ... -> block B-1
    -> learned per-channel Gaussian (top prior) -> flatten, standard normal,

block ``b`` being ``units[b]`` DenseFlow units with a cross-unit coupling after every
unit but the last (:class:`~resflow.layers.augment.DenseAugmentedBlock`): noise of
``growth`` (``k``) channels, ``sigma * e + mu`` with ``(mu, log sigma)`` from all
previous representations of the block (:class:`~resflow.nets.denseflow.CrossUnitNet`),
so every unit works on ``k`` more channels than the one before. A unit is
``modules[b]`` glow-like modules ``ActNorm -> 1x1 convolution -> affine coupling``
(scale ``exp(2 tanh(h / 2))``) whose network fuses a dense block with Nyström
self-attention (:class:`~resflow.nets.denseflow.DenseAttentionNet`): ``attention =
"authors"`` is the one-head form of the authors' code (their memory-order reshaping,
softmax over the first axis, landmarks scaled by ``1/sqrt(H W)``; the paper presets),
``"textbook"`` the multi-head Nyströmformer (the default, so that runs saved before the
field existed reload unchanged). ``L`` is the
number of glow-like modules, ``sum(units[b] * modules[b])``.

The model is a lower bound: ``log_prob`` is one sample of ``log p(z_aug) - log N(e) +
sum log sigma`` (one noise draw per coupling, and the dequantizer's), and
:func:`~resflow.evaluation.evaluate_bounds` (``resflow eval --iw-samples K``)
importance-weights ``K`` draws. Sampling is one inverse pass that drops the noise.

The authors' code dequantizes variationally with a flow of its own
(:func:`build_dense_dequantizer`: conditional affine couplings with residual dense
blocks, conditioned on dense-block features of the data at half resolution); the
``denseflow-cifar10`` preset (DenseFlow-74-10: blocks of 6, 4, 1 units of 5, 6, 20
modules, 48 channels, k = 10) uses it and has their parameter count, **130,647,294**.
The other image families' dequantizers (``dequantization``: uniform or Flow++'s) are
available too, when ``dense_dequantization.enabled`` is false.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from resflow.config import Config, ConfigError, param, replace
from resflow.distributions import StandardNormal
from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.layers.augment import DenseAugmentedBlock, NoiseAugmentation
from resflow.layers.base import FlowLayer, Sequential, Shape, zero_logdet
from resflow.layers.conv1x1 import InvertibleConv1x1
from resflow.layers.coupling import ChannelMask, Coupling
from resflow.layers.multiscale import Flatten
from resflow.layers.squeeze import Squeeze
from resflow.layers.transformers import Affine
from resflow.models.configs import MAX_WIDTH, ImageModelConfig
from resflow.models.dequantization import build_dequantizer
from resflow.models.multiscale import multiscale
from resflow.models.registry import register_model, register_preset
from resflow.nets.denseflow import (
    ContextDenseNet,
    CrossUnitNet,
    DenseAttentionNet,
    dense_context_processor,
)
from resflow.preprocess import Dequantizer, VariationalDequantizer, image_preprocessing
from resflow.train_config import TrainConfig


class SoftClampAffine(Affine):
    """``y = x exp(c tanh(h / c)) + t``: :class:`Affine` with its log-scale soft-clamped
    to ``(-c, c)`` (``c = bound = 2`` in DenseFlow's code); the identity at ``h = t = 0``."""

    def __init__(self, bound: float = 2.0) -> None:
        if not bound > 0:
            raise ValueError(f"bound must be positive, got {bound}")
        super().__init__("exp", clamp=bound)
        self.bound = bound


def learned_gaussian(channels: int) -> ActNorm:
    """A learned per-channel Gaussian ``N(mu_c, sigma_c^2)`` written as the flow
    ``(x - mu) / sigma`` into ``N(0, I)`` (an ActNorm without its data-dependent
    initialisation): the authors' ``ConvNormal2d``, starting at ``N(0, I)``."""
    layer = ActNorm(channels)
    layer.initialized.fill_(True)
    return layer


class Unsqueeze(FlowLayer):
    """The inverse of :class:`~resflow.layers.squeeze.Squeeze`: ``[4C, H, W] -> [C, 2H, 2W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze = Squeeze(2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze.inverse(x), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.squeeze(y)[0]

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(y), zero_logdet(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        c, h, w = input_shape
        if c % 4:
            raise ValueError(f"Unsqueeze needs channels divisible by 4, got {c}")
        return (c // 4, 2 * h, 2 * w)


@dataclass
class DenseDequantizationConfig(Config):
    """DenseFlow's variational dequantizer (the authors' code; ``enabled`` replaces the
    ``dequantization`` field's): ``eps`` at half resolution (squeezed), a learned
    per-channel Gaussian, ``couplings x [1x1 conv -> affine coupling]`` whose nets see
    dense-block features of the data, a last 1x1 conv, unsqueeze, sigmoid."""

    enabled: bool = param(False, help="DenseFlow's own variational dequantizer")
    couplings: int = param(4, ge=1, le=64, help="conditional couplings")
    hidden: int = param(64, ge=1, le=MAX_WIDTH, help="channels of their nets")
    depth: int = param(4, ge=1, le=64, help="layers of their residual dense blocks")
    growth: int = param(64, ge=1, le=MAX_WIDTH, help="growth of those dense blocks")
    context: int = param(64, ge=1, le=MAX_WIDTH, help="channels of the data's features")
    context_depth: int = param(4, ge=1, le=64, help="layers of the features' dense blocks")
    context_growth: int = param(16, ge=1, le=MAX_WIDTH, help="growth of those dense blocks")


@dataclass
class DenseFlowConfig(ImageModelConfig):
    """DenseFlow-L-k for images (defaults: DenseFlow-74-10, the paper's model)."""

    units: tuple[int, ...] = param((6, 4, 1), ge=1, le=256, help="DenseFlow units per block")
    modules: tuple[int, ...] = param(
        (5, 6, 20), ge=1, le=1024, help="glow-like modules per unit, per block"
    )
    hidden: tuple[int, ...] = param(
        (48, 48, 48), ge=2, le=MAX_WIDTH, help="channels of the coupling nets, per block"
    )
    growth: int = param(10, ge=1, le=MAX_WIDTH, help="growth rate k: noise channels per unit")
    dense_depth: int = param(7, ge=1, le=256, help="layers of the coupling nets' dense blocks")
    dense_growth: int = param(64, ge=1, le=MAX_WIDTH, help="growth of those dense blocks")
    attention: Literal["textbook", "authors"] = param(
        "textbook",
        help="Nyström attention: the authors' one-head form (their reshaping, column "
        "softmax, landmarks scaled by 1/sqrt(HW)) or the textbook multi-head one",
    )
    heads: int = param(4, ge=1, le=256, help="Nyström attention heads (divide hidden / 2)")
    landmarks: int = param(4, ge=1, le=65536, help="Nyström landmarks")
    pinv_iterations: int = param(
        6, ge=0, le=100, help="iterations of the Nyström pseudo-inverse (0: exact)"
    )
    cross_unit_factor: int = param(
        4, ge=1, le=64, help="hidden channels of the cross-unit nets, in multiples of inputs"
    )
    lu: bool = param(False, help="LU-parameterized 1x1 convolutions (the authors': full)")
    dense_dequantization: DenseDequantizationConfig = field(
        default_factory=DenseDequantizationConfig
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.units)
        if len(self.modules) != n or len(self.hidden) != n:
            raise ConfigError(
                f"units, modules and hidden need one number per block: got {self.units}, "
                f"{self.modules} and {self.hidden}"
            )
        if self.attention == "authors" and self.heads != 1:
            raise ConfigError(
                f"heads: the authors' Nyström attention has one head, got {self.heads} "
                "(set heads=1, or attention=textbook)"
            )
        for h in self.hidden:
            if (h // 2) % self.heads:
                raise ConfigError(
                    f"heads: {self.heads} must divide the attention channels hidden / 2 = {h // 2}"
                )
        if self.dense_dequantization.enabled and self.dequantization.kind != "uniform":
            raise ConfigError(
                "dense_dequantization.enabled and dequantization.kind="
                f"{self.dequantization.kind!r}: choose one dequantizer"
            )

    @property
    def n_modules(self) -> int:
        """``L``: glow-like modules in total."""
        return sum(u * m for u, m in zip(self.units, self.modules))


def glow_like_module(shape: Shape, j: int, cfg: DenseFlowConfig, hidden: int) -> list[FlowLayer]:
    """``ActNorm -> 1x1 conv -> affine coupling`` (the ``j``-th of a unit: the mask
    alternates) on examples of ``shape``."""
    c = shape[0]
    mask = ChannelMask(reverse=j % 2 == 1)
    c_a, c_b = mask.channels(tuple(shape))
    transformer = SoftClampAffine()
    net = DenseAttentionNet(
        c_a,
        transformer.n_params * c_b,
        hidden=hidden,
        depth=cfg.dense_depth,
        growth=cfg.dense_growth,
        heads=cfg.heads,
        landmarks=cfg.landmarks,
        pinv_iterations=cfg.pinv_iterations,
        attention=cfg.attention,
    )
    return [ActNorm(c), InvertibleConv1x1(c, cfg.lu), Coupling(mask, net, transformer)]


def dense_block(cfg: DenseFlowConfig, b: int, shape: Shape) -> DenseAugmentedBlock:
    """Block ``b`` on examples of ``shape``: its units and cross-unit couplings."""
    c, h, w = shape
    k = cfg.growth
    units, augmentations = [], []
    seen = c  # channels of [z_0, .., z_i], the cross-unit nets' input
    for i in range(cfg.units[b]):
        unit_shape = (c + i * k, h, w)
        layers = [
            layer
            for j in range(cfg.modules[b])
            for layer in glow_like_module(unit_shape, j, cfg, cfg.hidden[b])
        ]
        units.append(Sequential(layers))
        if i < cfg.units[b] - 1:
            net = CrossUnitNet(seen, k, cfg.cross_unit_factor)
            augmentations.append(NoiseAugmentation(k, net))
            seen += unit_shape[0]
    return DenseAugmentedBlock(units, augmentations)


def build_dense_dequantizer(
    cfg: DenseDequantizationConfig, levels: int, image_shape: tuple[int, int, int]
) -> VariationalDequantizer:
    """DenseFlow's variational dequantizer (see :class:`DenseDequantizationConfig`)."""
    c, h, w = image_shape
    if h % 2 or w % 2:
        raise ValueError(f"the dense dequantizer squeezes: it needs an even size, got {h}x{w}")
    sq = 4 * c
    layers: list[FlowLayer] = [Squeeze(2), learned_gaussian(sq)]
    for j in range(cfg.couplings):
        mask = ChannelMask(reverse=j % 2 == 1)
        c_a, c_b = mask.channels((sq, h // 2, w // 2))
        transformer = SoftClampAffine()
        net = ContextDenseNet(c_a, transformer.n_params * c_b, cfg.context, cfg.hidden,
                              cfg.depth, cfg.growth)  # fmt: skip
        layers += [InvertibleConv1x1(sq, lu=False), Coupling(mask, net, transformer)]
    layers += [InvertibleConv1x1(sq, lu=False), Unsqueeze()]
    processor = dense_context_processor(c, cfg.context, cfg.context_depth, cfg.context_growth)
    return VariationalDequantizer(levels, Sequential(layers), processor, "normal")


def build_denseflow(cfg: DenseFlowConfig) -> Flow:
    c, h, w = cfg.image_shape
    n = len(cfg.units)
    if h % 2**n or w % 2**n:
        raise ValueError(
            f"DenseFlow squeezes {n} times ({n} blocks): it needs a height and width "
            f"divisible by {2**n}, got {h}x{w}"
        )
    dequantizer: Dequantizer
    if cfg.dense_dequantization.enabled:
        dequantizer = build_dense_dequantizer(cfg.dense_dequantization, cfg.levels, cfg.image_shape)
    else:
        dequantizer = build_dequantizer(cfg.dequantization, cfg.levels, cfg.image_shape)
    layers = image_preprocessing(
        cfg.levels, None, cfg.horizontal_flip, dequantizer, normalize=((0.5,) * c, (1.0,) * c)
    )

    def step(b: int, shape: Shape) -> list[FlowLayer]:
        return [dense_block(cfg, b, shape)]

    def final(shape: Shape) -> list[FlowLayer]:
        return [learned_gaussian(shape[0]), Flatten(shape)]

    layers += multiscale(cfg.image_shape, n, step, final=final, squeeze_first=True, factor_out=True)
    body = Sequential(layers)
    return Flow(body, cfg.image_shape, base=StandardNormal(body.output_shape(cfg.image_shape)),
                levels=cfg.levels)  # fmt: skip


register_model(
    "denseflow",
    config=DenseFlowConfig,
    build=build_denseflow,
    kind="image",
    description="DenseFlow: cross-unit noise augmentation, dense and Nyström couplings "
    "(Grcić et al. 2021)",
)

# ---- presets: DenseFlow-74-10 (the paper's model for every data set) -------------------------
_PAPER = DenseFlowConfig(
    attention="authors",
    heads=1,
    horizontal_flip=True,
    dense_dequantization=DenseDequantizationConfig(enabled=True),
)


def _paper_train(batch: int, steps: int) -> TrainConfig:
    """The authors' commands: lr 1e-3, betas (0.9, 0.999), 5000 warm-up steps, no gradient
    clipping (resflow's clipping is set out of reach) and no weight averaging, ``steps`` =
    their epochs times their batches per epoch."""
    return TrainConfig(
        lr=1e-3, batch_size=batch, weight_decay=0.0, betas=(0.9, 0.999), warmup=5000,
        grad_clip=1e9, ema_decay=0.0, steps=steps,
    )  # fmt: skip


# what still differs from the authors' code (matejgrcic/DenseFlow), for every paper preset
_DIFFERENCES = (
    "; differences from the authors' code: AdamW at a constant rate after the warm-up "
    "(theirs: Adamax with the rate decayed by a factor per epoch, then a second run at 2e-5), "
    "flips only (their 'eta' augmentation also "
    "translates by up to 4%), Nyström landmarks as segment means also when 4 does not "
    "divide H*W (theirs needs it; never the case in these presets)"
)
register_preset(
    "denseflow-cifar10",
    "denseflow",
    _PAPER,
    train=_paper_train(64, 312_500),  # 400 epochs
    description="CIFAR-10, DenseFlow-74-10 with its variational dequantizer and the authors' "
    "one-head Nyström attention (4 landmarks; 130,647,294 parameters, the authors' count)"
    + _DIFFERENCES,
)
register_preset(
    "denseflow-imagenet32",
    "denseflow",
    _PAPER,
    train=_paper_train(64, 400_000),  # 20 epochs
    description="ImageNet 32x32, DenseFlow-74-10 with the authors' Nyström attention "
    "(130,647,294 parameters)" + _DIFFERENCES,
)
register_preset(
    "denseflow-imagenet64",
    "denseflow",
    replace(_PAPER, image_shape=(3, 64, 64)),
    train=_paper_train(32, 400_000),  # 10 epochs
    description="ImageNet 64x64, DenseFlow-74-10 with the authors' Nyström attention "
    "(batch 32; 130,647,294 parameters)" + _DIFFERENCES,
)

# ---- small presets that train in minutes on CPU ----------------------------------------------
_SMALL_TRAIN = TrainConfig(lr=2e-3, batch_size=64, weight_decay=0.0, warmup=100, grad_clip=1.0)
_SMALL = DenseFlowConfig(
    image_shape=(1, 8, 8),
    levels=17,
    units=(2, 2),
    modules=(2, 2),
    hidden=(16, 16),
    growth=4,
    dense_depth=2,
    dense_growth=16,
    heads=2,
    landmarks=4,
)
register_preset(
    "denseflow-digits",
    "denseflow",
    _SMALL,
    train=_SMALL_TRAIN,
    description="8x8 digits in a few minutes on CPU (DenseFlow-8-4)",
    default_for=("digits",),
)
register_preset(
    "denseflow-mnist",
    "denseflow",
    replace(_SMALL, image_shape=(1, 28, 28), levels=256),
    train=_SMALL_TRAIN,
    description="MNIST-sized images on CPU (DenseFlow-8-4)",
    default_for=("mnist", "fashion-mnist"),
)
