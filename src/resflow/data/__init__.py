"""Data sets: 2-D toy densities, tabular matrices and images, behind one entry point.

:func:`load_data` takes a :class:`DataConfig` (or a name) and returns a
:class:`DataSplit` (train / validation / test tensors, labels where the source has
them, levels) for any registered data set: a toy density (``8gaussians`` ...), an image
data set (``digits``, ``mnist`` ...), a tabular benchmark (``power``, ``gas``,
``hepmass``, ``miniboone``, ``bsds300``) or a user's matrix file (``.npy`` / ``.csv``).
Every name is looked up in :data:`resflow.data.registry.FORMATS`; each format is one
module of :mod:`resflow.data.formats` (``docs/DATA_FORMATS.md`` shows how to add one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resflow.config import replace
from resflow.data import formats as _formats  # noqa: F401  (registers the built-in formats)
from resflow.data.config import DataConfig
from resflow.data.formats.matrix import MATRIX
from resflow.data.images import load_image_data
from resflow.data.registry import DataKind, find_format
from resflow.data.split import DataSplit


def data_kind(name: str) -> DataKind:
    """``"image"`` or ``"vector"`` for a data set name, without loading it.

    >>> data_kind("mnist"), data_kind("moons"), data_kind("table.csv")
    ('image', 'vector', 'vector')
    """
    return find_format(name).kind


def load_data(
    name: str | DataConfig, data_dir: str | Path | None = None, **kwargs: Any
) -> DataSplit:
    """Load a data set from a :class:`DataConfig` (or a name plus its fields).

    * toy 2-D densities (:data:`resflow.data.toy2d.TOY_DATASETS`): ``n_train``,
      ``n_test`` and ``n_valid`` fresh samples (seeds ``seed``, ``seed + 1``, ``seed + 2``);
    * images (:data:`resflow.data.images.DATASETS` and any registered image format): see
      :func:`resflow.data.images.load_images`; ``n_valid`` training images held out;
    * a tabular benchmark (:data:`resflow.data.tabular_benchmarks.BENCHMARKS`): its own
      splits, from ``data_dir`` (or ``$RESFLOW_DATA_DIR``), downloaded with ``download``;
    * a path to a ``.npy`` / ``.csv`` / ``.txt`` matrix: standardised tabular data
      (:func:`resflow.data.tabular.load_tabular`) with its validation rows.

    >>> split = load_data("digits", n_valid=100)
    >>> split.shape, split.levels, len(split.train), len(split.valid), split.n_classes
    ((1, 8, 8), 17, 1400, 100, 10)
    """
    if isinstance(name, DataConfig):
        cfg = name if data_dir is None and not kwargs else replace(name, **kwargs)
        if data_dir is not None:
            cfg = replace(cfg, data_dir=str(data_dir))
    else:
        cfg = DataConfig(name=name, data_dir=None if data_dir is None else str(data_dir), **kwargs)
    fmt = find_format(cfg.name)
    if cfg.context_columns and fmt is not MATRIX:
        raise ValueError(
            f"context_columns: only a matrix file (.npy / .csv / .txt) has context columns, "
            f"not {cfg.name!r}"
        )
    if fmt.load is None:  # an image format: load_images reads its splits one by one
        return load_image_data(cfg)
    return fmt.load(cfg)


__all__ = ["DataConfig", "DataSplit", "data_kind", "load_data"]
