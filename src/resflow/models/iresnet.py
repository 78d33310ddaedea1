"""Invertible Residual Networks (i-ResNet; Behrmann et al., ICML 2019) as density models.

The residual-flow architecture with i-ResNet's choices as defaults -- a new family as
a partial of an existing one:

* coefficient 0.9 on every Lipschitz layer, ELU activations;
* the truncated (biased) power series -- 5 terms, one Hutchinson vector -- as the
  training objective, differentiated by ordinary backprop; the paper reports the same
  truncated series at test time too;
* ActNorm before each block; squeeze, then factor out half the channels, at every
  scale; a learned diagonal Gaussian prior; no fully connected tail.

Everything resflow prints as a log-likelihood is the true one: evaluation, ``log_prob``
in eval mode, scores and sampling checks use the exact log-determinant for small blocks
(2-D data) and 20 exact terms + an unbiased roulette tail otherwise. The paper's own
test figure, the 5-term truncated series, is printed *beside* the true figure by
``resflow eval`` and labelled as biased (``estimator.biased_eval_terms``; 0 turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from resflow.config import param
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.models.registry import register_model, register_preset
from resflow.models.residual_flow import (
    Activation,
    ImageFlowConfig,
    VectorFlowConfig,
    build_image_flow,
    build_vector_flow,
)
from resflow.train_config import TrainConfig


def truncated_series(n_terms: int = 5) -> EstimatorConfig:
    """i-ResNet's estimator: ``n_terms`` terms and no roulette as the training objective,
    with plain backprop through the series (as the paper trains); evaluated by the true
    log-density (exact or unbiased), with the paper's truncated figure reported beside it."""
    return EstimatorConfig(
        n_exact_terms=n_terms,
        dist="none",
        eval_dist="poisson",
        neumann_grad=False,
        grad_in_forward=False,
        biased_eval_terms=n_terms,
    )


@dataclass
class IResNetConfig(ImageFlowConfig):
    """Multi-scale i-ResNet for images (defaults: the paper's CIFAR-10 model)."""

    image_shape: tuple[int, int, int] = param((3, 32, 32), ge=1, help="(C, H, W)")
    coeff: float = param(0.9, gt=0, lt=1, help="Lipschitz coefficient of every layer (< 1)")
    activation: Activation = param("elu", help="1-Lipschitz activation")
    logit_alpha: float = param(0.05, gt=0, lt=0.5, help="alpha of the logit transform")
    squeeze_first: bool = param(True, help="squeeze before the first scale")
    factor_out: bool = param(True, help="factor out half the channels after each squeeze")
    actnorm_position: Literal["after", "before"] = param("before", help="ActNorm placement")
    fc_end: bool = param(False, help="fully connected residual blocks at the end")
    prior: Literal["standard", "diagonal"] = param("diagonal", help="base distribution")
    estimator: EstimatorConfig = field(default_factory=truncated_series)


@dataclass
class IResNetVectorConfig(VectorFlowConfig):
    """i-ResNet for vectors and 2-D data."""

    coeff: float = param(0.9, gt=0, lt=1, help="Lipschitz coefficient of every layer (< 1)")
    activation: Activation = param("elu", help="1-Lipschitz activation")
    prior: Literal["standard", "diagonal"] = param("diagonal", help="base distribution")
    estimator: EstimatorConfig = field(default_factory=truncated_series)


register_model(
    "iresnet",
    config=IResNetConfig,
    build=build_image_flow,
    kind="image",
    description="i-ResNet for images (Behrmann et al. 2019)",
)
register_model(
    "iresnet-vector",
    config=IResNetVectorConfig,
    build=build_vector_flow,
    kind="vector",
    family="iresnet",
    description="i-ResNet for vectors and 2-D data",
)

# The paper's density models: 3 scales of 16 blocks, 512 hidden channels; CIFAR-10
# squeezes first (32 -> 16 -> 8 -> 4), MNIST does not (28 -> 14 -> 7).
_PAPER_TRAIN = TrainConfig(lr=3e-3, weight_decay=0.0, warmup=1000, batch_size=64)
_IRESNET_TRAINING = (
    "adaptive power iteration (theirs: 5 per training pass; power_iterations=5), ActNorm "
    "initialised from the "
    "first batch (theirs: 1024 images), AdamW (0.9, 0.99) at batch 64 with a 1000-step warm-up, "
    "clipping and EMA (theirs: Adamax (0.9, 0.999) at batch 128, one epoch of warm-up, neither "
    "clipping nor EMA)"
)
register_preset(
    "iresnet-cifar10",
    "iresnet",
    IResNetConfig(image_shape=(3, 32, 32), n_blocks=(16, 16, 16), horizontal_flip=True),
    train=_PAPER_TRAIN,
    description="CIFAR-10, the i-ResNet paper's density model (25,028,640 parameters; the "
    "authors' code: 25,028,544, without the 2 frozen roulette parameters per block); differs "
    "from their dens_est_cifar.sh: logit(0.05) input (theirs: x - 1/2, no logit), half factored "
    "out after each squeeze (theirs: before it), flips only (theirs: also 4-pixel random crops), "
    + _IRESNET_TRAINING,
)
register_preset(
    "iresnet-mnist",
    "iresnet",
    IResNetConfig(
        image_shape=(1, 28, 28), n_blocks=(16, 16, 16), logit_alpha=1e-6, squeeze_first=False
    ),
    train=_PAPER_TRAIN,
    description="MNIST, the i-ResNet paper's density model (13,666,256 parameters); differs "
    "from the authors' code: 1x28x28 without an initial squeeze and logit(1e-6) input (theirs: "
    "MNIST padded to 32x32 and repeated to 3 channels, x - 1/2, the CIFAR-10 model: 25,028,544 "
    "parameters), half factored out after each squeeze (theirs: before it), " + _IRESNET_TRAINING,
)
register_preset(
    "iresnet-digits",
    "iresnet",
    IResNetConfig(
        image_shape=(1, 8, 8),
        levels=17,
        n_blocks=(4, 4),
        hidden=64,
        logit_alpha=1e-3,
        squeeze_first=False,
    ),
    train=TrainConfig(lr=2e-3, batch_size=64, warmup=100),
    description="8x8 digits in a few minutes on CPU",
    default_for=("digits", "image"),
)
register_preset(
    "iresnet-toy2d",
    "iresnet-vector",
    IResNetVectorConfig(dim=2, n_blocks=20, hidden=(64, 64)),
    train=TrainConfig(lr=1e-2, batch_size=500, weight_decay=0.0, warmup=1, ema_decay=0.995),
    description="2-D densities with the truncated estimator",
    default_for=("vector",),
)
