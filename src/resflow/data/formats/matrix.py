"""A user's matrix file (``.npy`` / ``.csv`` / ``.txt``, named by its path) as a vector data
set: rows shuffled, split and standardised by :func:`resflow.data.tabular.load_tabular`."""

from __future__ import annotations

from torch import Tensor

from resflow.data.config import DataConfig
from resflow.data.registry import DataFormat, register_format
from resflow.data.split import DataSplit
from resflow.data.tabular import load_tabular

__all__ = ["load_matrix_file"]


def load_matrix_file(cfg: DataConfig) -> DataSplit:
    """The matrix at path ``cfg.name``, split with seed ``cfg.seed``; its
    ``cfg.context_columns`` (standardised like the rest) become the contexts."""
    tab = load_tabular(cfg.name, seed=cfg.seed)
    if not cfg.context_columns:
        return DataSplit(tab.train, tab.test, tab.name, valid=tab.val, config=cfg)
    d = tab.train.shape[1]
    cols = list(cfg.context_columns)
    bad = [c for c in cols if c >= d]
    if bad or len(set(cols)) != len(cols):
        what = f"column(s) {bad} beyond its {d}" if bad else "a column named twice"
        raise ValueError(f"context_columns {tuple(cols)}: {cfg.name} has {what} (0-based)")
    data_cols = [c for c in range(d) if c not in cols]
    if not data_cols:
        raise ValueError(f"context_columns {tuple(cols)}: no column of {cfg.name} is left as data")

    def part(t: Tensor, which: list[int]) -> Tensor:
        return t[:, which].contiguous()

    return DataSplit(
        part(tab.train, data_cols),
        part(tab.test, data_cols),
        tab.name,
        valid=part(tab.val, data_cols),
        config=cfg,
        train_context=part(tab.train, cols),
        test_context=part(tab.test, cols),
        valid_context=part(tab.val, cols),
    )


MATRIX = register_format(
    DataFormat(
        names=("*.npy", "*.csv", "*.txt"),
        kind="vector",
        load=load_matrix_file,
        group="a path to a matrix file",
        description="a .npy / .csv / .txt matrix named by its path (one row per example)",
    )
)
