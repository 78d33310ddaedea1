"""Tiny training runs shared by the data-parallel tests and their torchrun worker: the
same call trains with one process (in the test) or as one rank of two (in the worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from resflow.config import replace
from resflow.data import DataSplit, load_data
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.models import get_preset
from resflow.models.naf import MAFConfig
from resflow.training import TrainConfig, Trainer, TrainResult


def _cfg(**kw: Any) -> TrainConfig:
    base = dict(steps=4, batch_size=64, lr=1e-2, warmup=1, eval_every=4, checkpoint_every=2,
                log_every=1, tensorboard=False, progress=False)  # fmt: skip
    return TrainConfig(**(base | kw))


def _toy() -> DataSplit:
    data = load_data("8gaussians", n_train=256, n_test=64)
    dtype = torch.get_default_dtype()  # float64 in the scenarios of DOUBLE
    return DataSplit(data.train.to(dtype), data.test.to(dtype), data.name)


def _digits() -> DataSplit:
    data = load_data("digits")
    return DataSplit(data.train[:128], data.test[:32], "digits", data.levels)


def _tiny_residual(**kw: Any) -> Any:
    return get_preset("toy2d", n_blocks=2, hidden=(16, 16), **kw)


DOUBLE = ("exact", "accumulate", "batchnorm")
"""Scenarios compared with one process: in float64, so that gradients that are zero
up to rounding (e.g. of the last ActNorm's bias) do not become Adam steps of ``lr``."""

SCENARIOS: dict[str, Any] = {
    # exact logdet, ActNorm: deterministic, so 2 x 32 must equal 1 x 64
    "exact": lambda: (_tiny_residual(), _toy(), _cfg()),
    # the same with two micro-batches per step (4 x 16 over two ranks)
    "accumulate": lambda: (_tiny_residual(), _toy(), _cfg(update_freq=2)),
    # MAF with batch normalization: statistics over the global batch
    "batchnorm": lambda: (
        MAFConfig(dim=2, n_flows=3, hidden=(16, 16), batch_norm=True),
        _toy(),
        _cfg(),
    ),
    # the paper's stochastic estimator (roulette + Hutchinson, Neumann gradient in forward)
    "stochastic": lambda: (_tiny_residual(estimator=EstimatorConfig()), _toy(), _cfg()),
    # an image model: Lipschitz convolutions, dequantization noise, sharded evaluation
    "image": lambda: (
        get_preset("digits-small", n_blocks=(1, 1), hidden=8, fc_blocks=1, fc_hidden=(8,)),
        _digits(),
        _cfg(steps=2, batch_size=16, eval_every=2, eval_batch_size=8),
    ),
}


def run_scenario(
    name: str, out: Path, cfg_kw: dict[str, Any] | None = None, **trainer_kw: Any
) -> tuple[Trainer, TrainResult]:
    """Train scenario ``name`` into ``out`` (``cfg_kw`` replace training settings)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if name in DOUBLE else default)
    try:
        model_cfg, data, cfg = SCENARIOS[name]()
        cfg = replace(cfg, **(cfg_kw or {}))
        trainer = Trainer(model_cfg, data, cfg, out, **trainer_kw)
        return trainer, trainer.fit()
    finally:
        torch.set_default_dtype(default)
