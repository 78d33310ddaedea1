"""A user's matrix file (``.npy`` / ``.csv`` / ``.txt``, named by its path) as a vector data
set: rows shuffled, split and standardised by :func:`resflow.data.tabular.load_tabular`."""

from __future__ import annotations

from resflow.data.config import DataConfig
from resflow.data.registry import DataFormat, register_format
from resflow.data.split import DataSplit
from resflow.data.tabular import load_tabular

__all__ = ["load_matrix_file"]


def load_matrix_file(cfg: DataConfig) -> DataSplit:
    """The matrix at path ``cfg.name``, split with seed ``cfg.seed``."""
    tab = load_tabular(cfg.name, seed=cfg.seed)
    return DataSplit(tab.train, tab.test, tab.name, valid=tab.val, config=cfg)


MATRIX = register_format(
    DataFormat(
        names=("*.npy", "*.csv", "*.txt"),
        kind="vector",
        load=load_matrix_file,
        group="a path to a matrix file",
        description="a .npy / .csv / .txt matrix named by its path (one row per example)",
    )
)
