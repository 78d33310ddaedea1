"""The tabular benchmarks of the MAF paper (``power``, ``gas``, ``hepmass``,
``miniboone``, ``bsds300``, see :mod:`resflow.data.tabular_benchmarks`) as vector data
sets with their own train / validation / test splits."""

from __future__ import annotations

import os

from resflow.data.config import DataConfig
from resflow.data.formats.common import DATA_DIR_ENV
from resflow.data.registry import DataFormat, register_format
from resflow.data.split import DataSplit
from resflow.data.tabular_benchmarks import BENCHMARKS, load_benchmark

__all__ = ["load_uci"]


def load_uci(cfg: DataConfig) -> DataSplit:
    """The benchmark from ``data_dir`` (else ``$RESFLOW_DATA_DIR``), downloaded with
    ``download``."""
    root = cfg.data_dir or os.environ.get(DATA_DIR_ENV, "").strip() or None
    tab = load_benchmark(cfg.name, root, download=cfg.download)
    return DataSplit(tab.train, tab.test, tab.name, valid=tab.val, config=cfg)


UCI = register_format(
    DataFormat(
        names=tuple(BENCHMARKS),
        kind="vector",
        load=load_uci,
        group="a tabular benchmark",
        description="MAF's tabular benchmarks (UCI and BSDS300), preprocessed and split",
    )
)
