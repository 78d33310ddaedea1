"""The toy 2-D densities (``8gaussians``, ``checkerboard``, ...) of
:mod:`resflow.data.toy2d` as vector data sets: fresh samples for each split.

>>> split = load_toy(DataConfig("moons", n_train=4, n_test=2, n_valid=1))
>>> split.shape, len(split.train), len(split.test), len(split.valid)
((2,), 4, 2, 1)
"""

from __future__ import annotations

import torch

from resflow.data.config import DataConfig
from resflow.data.registry import DataFormat, register_format
from resflow.data.split import DataSplit
from resflow.data.toy2d import TOY_DATASETS, sample_toy

__all__ = ["load_toy"]


def load_toy(cfg: DataConfig) -> DataSplit:
    """``n_train``, ``n_test`` and ``n_valid`` samples, seeded ``seed``, ``seed + 1`` and
    ``seed + 2``."""
    gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(3)]
    return DataSplit(
        sample_toy(cfg.name, cfg.n_train, gens[0]),
        sample_toy(cfg.name, cfg.n_test, gens[1]),
        cfg.name,
        valid=sample_toy(cfg.name, cfg.n_valid, gens[2]) if cfg.n_valid else None,
        config=cfg,
    )


TOY = register_format(
    DataFormat(
        names=TOY_DATASETS,
        kind="vector",
        load=load_toy,
        group="a toy density",
        description="2-D toy densities of FFJORD / Residual Flows / NAF (fresh samples)",
    )
)
