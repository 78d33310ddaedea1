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

* likelihood mode (``noise_std = 0``, the presets): the model is a density of the
  dequantized data and its bits/dim are comparable with every other resflow family
  (the paper's 2.99 bits/dim on ImageNet 64 is in this mode);
* sample-quality mode (``noise_std = sigma > 0``; the paper: 0.05 at 64x64): Gaussian
  noise of std ``sigma`` on the ``[-1, 1]`` scale is added to the data in training and
  evaluation (:class:`~resflow.preprocess.noise.GaussianNoise`), so the reported
  likelihood is that *of the noisy data* (every evaluation says so); samples are
  denoised by ``x_hat = y + sigma^2 grad_y log p(y)`` with the model's own score
  (``resflow sample --denoise``, :func:`resflow.evaluation.decode`).

A class-conditional TarFlow (``n_classes``) adds a class embedding to every token;
with ``label_dropout`` the label is replaced by a learned null class in training, so
that ``resflow sample --guidance w`` samples with classifier-free guidance on
``mu`` and ``alpha`` (:mod:`resflow.layers.guidance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from resflow.config import Config, param
from resflow.distributions import StandardNormal
from resflow.flow import Flow
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.guidance import ContextDropout
from resflow.layers.multiscale import Flatten
from resflow.layers.patch import Patchify
from resflow.layers.tarflow import TarFlowBlock
from resflow.models.dequantization import DequantizationConfig, build_dequantizer
from resflow.models.registry import register_model, register_preset
from resflow.nets.transformer import CausalTransformer
from resflow.preprocess import image_preprocessing
from resflow.train_config import TrainConfig

MAX_WIDTH = 65536


@dataclass
class TarFlowConfig(Config):
    """TarFlow for images (defaults: the paper's ImageNet 64 likelihood model)."""

    image_shape: tuple[int, int, int] = param((3, 64, 64), ge=1, le=8192, help="(C, H, W)")
    levels: int = param(256, ge=2, le=65536, help="quantization levels of the data")
    patch_size: int = param(2, ge=1, le=256, help="patch size p (tokens of C p^2 features)")
    width: int = param(768, ge=1, le=MAX_WIDTH, help="transformer width")
    n_blocks: int = param(8, ge=1, le=256, help="autoregressive flow blocks")
    depth: int = param(8, ge=1, le=256, help="transformer layers per block")
    heads: int = param(12, ge=1, le=1024, help="attention heads (width must be a multiple)")
    mlp_ratio: int = param(4, ge=1, le=64, help="MLP hidden width in multiples of width")
    noise_std: float = param(
        0.0, ge=0, lt=2, help="Gaussian noise augmentation std on the [-1, 1] scale (0: none)"
    )
    label_dropout: float = param(
        0.1, ge=0, lt=1, help="class-conditional: probability of the null class in training"
    )
    horizontal_flip: bool = param(False, help="random horizontal flips in training")
    n_classes: int = param(0, ge=0, le=100_000, help="classes (0: unconditional)")
    dequantization: DequantizationConfig = field(default_factory=DequantizationConfig)


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

# ---- presets -------------------------------------------------------------------------------
register_preset(
    "tarflow-imagenet64",
    "tarflow",
    TarFlowConfig(),
    train=TrainConfig(lr=1e-4, batch_size=256, weight_decay=1e-4, warmup=1000, grad_clip=1.0),
    description="ImageNet 64x64, the paper's likelihood architecture (patch 2, width 768, "
    "8 blocks x 8 layers); training settings are resflow's",
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
