"""TarFlow (Zhai et al., ICML 2025): config, builder, presets.

Registered as ``tarflow`` (images). The image is cut into ``p x p`` patches, a
sequence of ``T = HW / p^2`` tokens of ``C p^2`` features
(:class:`~resflow.layers.patch.Patchify`), and transformed by ``n_blocks``
autoregressive blocks (:class:`~resflow.layers.tarflow.TarFlowBlock`), each a causal
transformer of ``depth`` pre-LayerNorm layers at width ``width`` predicting
``(alpha_t, mu_t)`` from the tokens before ``t``, the token order reversed from one
block to the next; the base is a standard normal. Data: ``2 (x + u) / L - 1`` in
``[-1, 1]`` (uniform or variational dequantization, :mod:`resflow.models.dequantization`).

**Two training modes** (one field, ``noise_std``):

* likelihood mode (``noise_std = 0``, ``tarflow-imagenet64``): the model is a density
  of the dequantized data and its bits/dim are comparable with every other resflow
  family (the paper's 2.99 bits/dim on ImageNet 64 is in this mode);
* sample-quality mode (``noise_std = sigma > 0``; the paper: 0.05 at 64x64, 0.07 on
  AFHQ 256, 0.15 at 128x128): Gaussian noise of std ``sigma`` on the ``[-1, 1]`` scale
  is added to the data in training and evaluation, so the reported likelihood is that
  *of the noisy data* (every evaluation says so); samples are denoised by
  ``x_hat = y + sigma^2 grad_y log p(y)`` with the model's own score (``resflow sample
  --denoise``, :func:`resflow.evaluation.decode`). ``noise_mode`` says how the noisy
  data are made: ``"official"`` (the authors' ``noise_type=gaussian``, the
  sample-quality presets) adds the noise to ``2 x / (L - 1) - 1`` with no uniform
  dequantization (:class:`~resflow.preprocess.noise.QuantizedGaussianNoise`);
  ``"dequantized"`` (the default, as before the field existed) adds it after the
  dequantizer (:class:`~resflow.preprocess.noise.GaussianNoise`).

A class-conditional TarFlow (``n_classes``) adds a class embedding to every token;
with ``label_dropout`` the label is replaced by a learned null class in training, so
that ``resflow sample --guidance w`` samples with classifier-free guidance on
``mu`` and ``alpha`` (:mod:`resflow.layers.guidance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from resflow.config import ConfigError, param, replace
from resflow.distributions import StandardNormal
from resflow.flow import Flow
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.guidance import ContextDropout
from resflow.layers.multiscale import Flatten
from resflow.layers.patch import Patchify
from resflow.layers.tarflow import TarFlowBlock
from resflow.models.configs import MAX_SIDE, MAX_WIDTH, ClassConditionalConfig, ImageModelConfig
from resflow.models.dequantization import build_dequantizer
from resflow.models.registry import register_model, register_preset
from resflow.nets.transformer import CausalTransformer
from resflow.preprocess import Normalize, RandomHorizontalFlip, image_preprocessing
from resflow.preprocess.noise import QuantizedGaussianNoise
from resflow.train_config import TrainConfig


@dataclass
class TarFlowConfig(ClassConditionalConfig, ImageModelConfig):
    """TarFlow for images (defaults: the paper's ImageNet 64 likelihood model)."""

    image_shape: tuple[int, int, int] = param((3, 64, 64), ge=1, le=MAX_SIDE, help="(C, H, W)")
    patch_size: int = param(2, ge=1, le=256, help="patch size p (tokens of C p^2 features)")
    width: int = param(768, ge=1, le=MAX_WIDTH, help="transformer width")
    n_blocks: int = param(8, ge=1, le=256, help="autoregressive flow blocks")
    depth: int = param(8, ge=1, le=256, help="transformer layers per block")
    heads: int = param(12, ge=1, le=1024, help="attention heads (width must be a multiple)")
    mlp_ratio: int = param(4, ge=1, le=64, help="MLP hidden width in multiples of width")
    noise_std: float = param(
        0.0, ge=0, lt=2, help="Gaussian noise augmentation std on the [-1, 1] scale (0: none)"
    )
    noise_mode: Literal["dequantized", "official"] = param(
        "dequantized",
        help="how noise_std > 0 makes the noisy data: after uniform (or variational) "
        "dequantization, or the authors' Gaussian noise on the levels without it",
    )
    label_dropout: float = param(
        0.1, ge=0, lt=1, help="class-conditional: probability of the null class in training"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_mode == "official":
            if self.noise_std == 0:
                raise ConfigError(
                    "noise_mode: 'official' is the authors' Gaussian noise mode; it needs "
                    "noise_std > 0 (likelihood mode: noise_std=0, noise_mode=dequantized)"
                )
            if self.dequantization.kind != "uniform":
                raise ConfigError(
                    "noise_mode: 'official' adds no dequantization noise; "
                    f"dequantization.kind={self.dequantization.kind!r} would be ignored"
                )


def tarflow_blocks(cfg: TarFlowConfig, tokens: int, features: int) -> list[FlowLayer]:
    """The ``n_blocks`` blocks on sequences of ``tokens x features``, alternating order."""
    return [
        TarFlowBlock(
            CausalTransformer(
                features,
                2 * features,
                tokens,
                width=cfg.width,
                depth=cfg.depth,
                heads=cfg.heads,
                mlp_ratio=cfg.mlp_ratio,
                context_features=cfg.n_classes,
            ),
            flip=i % 2 == 1,
        )
        for i in range(cfg.n_blocks)
    ]


def build_tarflow(cfg: TarFlowConfig) -> Flow:
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} must be a multiple of heads {cfg.heads}")
    c = cfg.image_shape[0]
    patch = Patchify(cfg.image_shape, cfg.patch_size)
    tokens, features = patch.output_shape(cfg.image_shape)
    body: FlowLayer = Sequential(
        [patch, *tarflow_blocks(cfg, tokens, features), Flatten((tokens, features))]
    )
    if cfg.n_classes and cfg.label_dropout > 0:
        body = ContextDropout(body, cfg.label_dropout)
    if cfg.noise_mode == "official":  # 2 x / (L - 1) - 1 + sigma eps, no uniform noise
        layers: list[FlowLayer] = [QuantizedGaussianNoise(cfg.levels, cfg.noise_std / 2)]
        if cfg.horizontal_flip:
            layers.append(RandomHorizontalFlip())
        layers.append(Normalize((0.5,) * c, (0.5,) * c))
    else:
        layers = image_preprocessing(
            cfg.levels,
            None,
            cfg.horizontal_flip,
            build_dequantizer(cfg.dequantization, cfg.levels, cfg.image_shape),
            normalize=((0.5,) * c, (0.5,) * c),
            noise_std=cfg.noise_std / 2,  # on [0, 1): half the std on [-1, 1]
        )
    return Flow(
        Sequential([*layers, body]),
        cfg.image_shape,
        base=StandardNormal(tokens * features),
        levels=cfg.levels,
        n_classes=cfg.n_classes or None,
    )


register_model(
    "tarflow",
    config=TarFlowConfig,
    build=build_tarflow,
    kind="image",
    description="TarFlow: transformer autoregressive flow over patches (Zhai et al. 2025)",
)

# ---- presets: the paper's models as the authors' commands (apple/ml-tarflow) train them -----
# Their optimizer: AdamW (0.9, 0.95), weight decay 1e-4, lr 1e-4, one epoch of linear warm-up
# then a cosine decay to 1e-6, no gradient clipping, no EMA; random horizontal flips; bf16
# autocast in the noise mode. Steps: their epochs times their batches per epoch.
_AUTHORS = (
    "; as the authors' code: their optimizer (AdamW 0.9/0.95, wd 1e-4, lr 1e-4, no EMA, "
    "no clipping), flips, heads of 64 channels, alternating token order; differences: the "
    "learning rate stays at 1e-4 after the warm-up (theirs: cosine decay to 1e-6), each "
    "transformer shifts its input by one token with a learned start token and ends with a "
    "LayerNorm (theirs: shifts its output, so the first token passes unchanged, and no final "
    "norm; 3 x width more parameters per block)"
)
_NULL_CLASS = (
    ", a learned null class for dropped labels (theirs: the mean of the class embeddings; "
    "width more parameters per block)"
)


def _authors_train(batch: int, steps: int, warmup: int, bf16: bool) -> TrainConfig:
    return TrainConfig(
        lr=1e-4, batch_size=batch, weight_decay=1e-4, betas=(0.9, 0.95), warmup=warmup,
        steps=steps, grad_clip=1e9, ema_decay=0.0, precision="bf16" if bf16 else "fp32",
    )  # fmt: skip


_IMAGENET64 = TarFlowConfig(horizontal_flip=True)  # patch 2, width 768, 8 blocks x 8 layers
register_preset(
    "tarflow-imagenet64",
    "tarflow",
    _IMAGENET64,
    train=_authors_train(256, 500_000, 5_000, bf16=False),  # 100 epochs, fp32
    description="ImageNet 64x64, the paper's likelihood model (patch 2, width 768, 8 blocks x "
    "8 layers, uniform dequantization; 460,161,216 parameters, the authors' 460,142,784)"
    + _AUTHORS,
)
_NOISE64 = replace(_IMAGENET64, noise_std=0.05, noise_mode="official")
register_preset(
    "tarflow-imagenet64-noise",
    "tarflow",
    _NOISE64,
    train=_authors_train(256, 1_000_000, 5_000, bf16=True),  # 200 epochs
    description="ImageNet 64x64 unconditional, the paper's sample-quality model (noise 0.05 "
    "on [-1, 1] without uniform dequantization, denoised samples; 460,161,216 parameters, "
    "the authors' 460,142,784)" + _AUTHORS,
)
register_preset(
    "tarflow-imagenet64-cond",
    "tarflow",
    replace(_NOISE64, n_classes=1000, label_dropout=0.1),
    train=_authors_train(256, 1_000_000, 5_000, bf16=True),  # 200 epochs
    description="ImageNet 64x64 class-conditional, the paper's sample-quality model (noise "
    "0.05 without uniform dequantization, labels dropped 10% for guidance; 466,311,360 "
    "parameters, the authors' 466,286,784; their data: full ImageNet resized and "
    "center-cropped, here the downsampled ImageNet 64)" + _NULL_CLASS + _AUTHORS,
)
register_preset(
    "tarflow-afhq256",
    "tarflow",
    TarFlowConfig(
        image_shape=(3, 256, 256),
        patch_size=8,
        width=768,
        heads=12,
        n_blocks=8,
        depth=8,
        noise_std=0.07,
        noise_mode="official",
        n_classes=3,
        label_dropout=0.1,
        horizontal_flip=True,
    ),  # fmt: skip
    train=_authors_train(256, 228_000, 57, bf16=True),  # 4000 epochs of 14,630 images
    description="AFHQ 256x256 (cat, dog, wild), the paper's model (patch 8, width 768, 8 blocks "
    "x 8 layers, noise 0.07 without uniform dequantization, labels dropped 10%; 463,506,432 "
    "parameters, the authors' 463,481,856; an "
    "architecture preset: resflow has no AFHQ loader)" + _NULL_CLASS + _AUTHORS,
)
register_preset(
    "tarflow-imagenet128",
    "tarflow",
    TarFlowConfig(
        image_shape=(3, 128, 128),
        patch_size=4,
        width=1024,
        heads=16,
        n_blocks=8,
        depth=8,
        noise_std=0.15,
        noise_mode="official",
        n_classes=1000,
        label_dropout=0.1,
        horizontal_flip=True,
    ),  # fmt: skip
    train=_authors_train(768, 534_000, 1_668, bf16=True),  # 320 epochs
    description="ImageNet 128x128 class-conditional, the paper's model (patch 4, width 1024, "
    "8 blocks x 8 layers, noise 0.15 without uniform dequantization, labels dropped 10%; "
    "823,960,320 parameters, the authors' 823,927,552; an "
    "architecture preset: resflow has no ImageNet 128 loader)" + _NULL_CLASS + _AUTHORS,
)
_SMALL = TrainConfig(lr=1e-3, batch_size=64, weight_decay=0.0, warmup=100, grad_clip=1.0)
register_preset(
    "tarflow-digits",
    "tarflow",
    TarFlowConfig(
        image_shape=(1, 8, 8), levels=17, patch_size=2, width=64, n_blocks=4, depth=2, heads=4
    ),
    train=_SMALL,
    description="8x8 digits in a few minutes on CPU",
    default_for=("digits",),
)
register_preset(
    "tarflow-mnist",
    "tarflow",
    TarFlowConfig(
        image_shape=(1, 28, 28), levels=256, patch_size=4, width=96, n_blocks=4, depth=2, heads=4
    ),
    train=_SMALL,
    description="MNIST-sized images on CPU",
    default_for=("mnist", "fashion-mnist"),
)
