"""Model presets: the paper's architectures and small ones that train on 2 CPU cores.

Parameter counts of the paper presets equal those of the authors' models (MNIST
16,608,693; CIFAR-10 25,174,233; ImageNet32 47,099,289; ImageNet64 53,294,475).
"""

from __future__ import annotations

from dataclasses import replace

from resflow.models.residual_flow import (
    EstimatorConfig,
    ImageFlowConfig,
    ModelConfig,
    VectorFlowConfig,
)

PRESETS: dict[str, ModelConfig] = {
    # --- the paper (Chen et al. 2019, Appendix E) ---
    "mnist": ImageFlowConfig(image_shape=(1, 28, 28), n_blocks=(16, 16, 16), logit_alpha=1e-6),
    "cifar10": ImageFlowConfig(
        image_shape=(3, 32, 32), n_blocks=(16, 16, 16), logit_alpha=0.05, horizontal_flip=True
    ),
    "imagenet32": ImageFlowConfig(image_shape=(3, 32, 32), n_blocks=(32, 32, 32), logit_alpha=0.05),
    "imagenet64": ImageFlowConfig(
        image_shape=(3, 64, 64),
        n_blocks=(32, 32, 32),
        logit_alpha=0.05,
        squeeze_first=True,
        factor_out=True,
    ),
    "celebahq256": ImageFlowConfig(
        image_shape=(3, 256, 256),
        levels=32,
        n_blocks=(16,) * 6,
        logit_alpha=0.05,
        squeeze_first=True,
        factor_out=True,
        horizontal_flip=True,
    ),
    # --- small presets for CPU ---
    "digits-small": ImageFlowConfig(
        image_shape=(1, 8, 8),
        levels=17,
        n_blocks=(4, 4),
        hidden=64,
        logit_alpha=1e-3,
        fc_blocks=2,
        fc_hidden=(64, 64),
    ),
    "mnist-small": ImageFlowConfig(
        image_shape=(1, 28, 28),
        n_blocks=(2, 2, 2),
        hidden=64,
        logit_alpha=1e-6,
        fc_blocks=2,
        fc_hidden=(64, 64),
    ),
    # --- 2-D / vector data ---
    "toy2d": VectorFlowConfig(
        dim=2,
        n_blocks=20,
        hidden=(64, 64),
        coeff=0.98,
        estimator=EstimatorConfig(train_method="exact", eval_method="exact"),
    ),
    "toy2d-paper": VectorFlowConfig(
        dim=2,
        n_blocks=100,
        hidden=(128, 128, 128, 128),
        coeff=0.9,
        actnorm=False,
        estimator=EstimatorConfig(train_method="exact", eval_method="exact"),
    ),
}


def get_preset(name: str, **overrides: object) -> ModelConfig:
    """A copy of preset ``name`` with fields replaced by ``overrides``."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return replace(cfg, **overrides)  # type: ignore[arg-type]


TRAINING: dict[str, dict[str, object]] = {
    # measured on 8gaussians (benchmarks/toy2d.py): reaches the data entropy + 0.05 nats
    # in about 1.5 minutes on 2 CPU cores
    "toy2d": {"lr": 1e-2, "batch_size": 500, "weight_decay": 0.0, "warmup": 1, "ema_decay": 0.995},
    "toy2d-paper": {"lr": 1e-3, "batch_size": 500, "weight_decay": 1e-5},
    "digits-small": {"lr": 2e-3, "batch_size": 64, "warmup": 100},
    "mnist-small": {"lr": 2e-3, "batch_size": 64, "warmup": 100},
}
"""Recommended training settings per preset (used by the CLI unless flags override)."""


def training_defaults(name: str) -> dict[str, object]:
    """Training settings recommended for preset ``name`` (empty: the paper's defaults)."""
    return dict(TRAINING.get(name, {}))
