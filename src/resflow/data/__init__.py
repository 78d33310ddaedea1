"""Data sets: 2-D toy densities, tabular matrices and images, behind one entry point.

:func:`load_data` takes a :class:`DataConfig` (or a name) and returns a
:class:`DataSplit` (train / validation / test tensors, labels where the source has
them, levels) for any data set: a toy density (``8gaussians`` ...), an image data set
(``digits``, ``mnist`` ...), a tabular benchmark (``power``, ``gas``, ``hepmass``,
``miniboone``, ``bsds300``) or a user's matrix file (``.npy`` / ``.csv``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from resflow.config import replace
from resflow.data.config import DataConfig, is_file_name


@dataclass
class DataSplit:
    """Training, validation and test data: float ``[N, D]`` vectors or integer
    ``[N, C, H, W]`` images with ``levels`` quantization levels (``None`` for
    continuous data); ``*_labels`` are ``int64 [N]`` class labels or ``None``.
    ``config`` is what loaded it (``None`` for a split built by hand)."""

    train: Tensor
    test: Tensor
    name: str = "data"
    levels: int | None = None
    valid: Tensor | None = None
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    config: DataConfig | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def n_classes(self) -> int | None:
        """Number of classes (from the labels), ``None`` without labels."""
        if self.train_labels is None:
            return None
        return int(self.train_labels.max()) + 1


def _carve_valid(split: DataSplit, n_valid: int, seed: int) -> DataSplit:
    """Hold out ``n_valid`` random training examples as the validation part."""
    if n_valid == 0:
        return split
    n = len(split.train)
    if n_valid >= n:
        raise ValueError(f"n_valid={n_valid} leaves no training data (the training set has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    keep, held = perm[n_valid:].sort().values, perm[:n_valid].sort().values
    labels = split.train_labels
    split.valid, split.train = split.train[held], split.train[keep]
    if labels is not None:
        split.valid_labels, split.train_labels = labels[held], labels[keep]
    return split


def data_kind(name: str) -> str:
    """``"image"`` or ``"vector"`` for a data set name, without loading it."""
    from resflow.data.images import DATASETS
    from resflow.data.tabular_benchmarks import BENCHMARKS
    from resflow.data.toy2d import TOY_DATASETS

    if name in DATASETS:
        return "image"
    if name in TOY_DATASETS or name in BENCHMARKS or is_file_name(name):
        return "vector"
    raise ValueError(_unknown(name))


def _unknown(name: str) -> str:
    from resflow.data.images import DATASETS
    from resflow.data.tabular_benchmarks import BENCHMARKS
    from resflow.data.toy2d import TOY_DATASETS

    return (
        f"unknown data set {name!r}: use a toy density {list(TOY_DATASETS)}, an image data "
        f"set {list(DATASETS)}, a tabular benchmark {list(BENCHMARKS)}, or a path to a "
        ".npy/.csv matrix"
    )


def load_data(
    name: str | DataConfig, data_dir: str | Path | None = None, **kwargs: Any
) -> DataSplit:
    """Load a data set from a :class:`DataConfig` (or a name plus its fields).

    * toy 2-D densities (:data:`resflow.data.toy2d.TOY_DATASETS`): ``n_train``,
      ``n_test`` and ``n_valid`` fresh samples (seeds ``seed``, ``seed + 1``, ``seed + 2``);
    * images (:data:`resflow.data.images.DATASETS`): see
      :func:`resflow.data.images.load_images`; ``n_valid`` training images held out;
    * a tabular benchmark (:data:`resflow.data.tabular_benchmarks.BENCHMARKS`): its own
      splits, from ``data_dir`` (or ``$RESFLOW_DATA_DIR``), downloaded with ``download``;
    * a path to a ``.npy`` / ``.csv`` / ``.txt`` matrix: standardised tabular data
      (:func:`resflow.data.tabular.load_tabular`) with its validation rows.
    """
    if isinstance(name, DataConfig):
        cfg = name if data_dir is None and not kwargs else replace(name, **kwargs)
        if data_dir is not None:
            cfg = replace(cfg, data_dir=str(data_dir))
    else:
        cfg = DataConfig(name=name, data_dir=None if data_dir is None else str(data_dir), **kwargs)
    from resflow.data.images import DATA_DIR_ENV, DATASETS, load_images
    from resflow.data.toy2d import TOY_DATASETS, sample_toy

    if cfg.name in TOY_DATASETS:
        gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(3)]
        split = DataSplit(
            sample_toy(cfg.name, cfg.n_train, gens[0]),
            sample_toy(cfg.name, cfg.n_test, gens[1]),
            cfg.name,
            valid=sample_toy(cfg.name, cfg.n_valid, gens[2]) if cfg.n_valid else None,
            config=cfg,
        )
        return split
    if cfg.name in DATASETS:
        kw = dict(
            download=cfg.download, n_bits=cfg.n_bits, image_size=cfg.image_size, path=cfg.path
        )
        train = load_images(cfg.name, "train", cfg.data_dir, **kw)  # type: ignore[arg-type]
        test = load_images(cfg.name, "test", cfg.data_dir, **kw)  # type: ignore[arg-type]
        split = DataSplit(
            train.images,
            test.images,
            cfg.name,
            train.levels,
            train_labels=train.labels,
            test_labels=test.labels,
            config=cfg,
        )
        return _carve_valid(split, cfg.n_valid, cfg.seed)
    from resflow.data.tabular_benchmarks import BENCHMARKS, load_benchmark

    if cfg.name in BENCHMARKS:
        root = cfg.data_dir or os.environ.get(DATA_DIR_ENV, "").strip() or None
        tab = load_benchmark(cfg.name, root, download=cfg.download)
        return DataSplit(tab.train, tab.test, tab.name, valid=tab.val, config=cfg)
    if is_file_name(cfg.name):
        from resflow.data.tabular import load_tabular

        tab = load_tabular(cfg.name, seed=cfg.seed)
        return DataSplit(tab.train, tab.test, tab.name, valid=tab.val, config=cfg)
    raise ValueError(_unknown(cfg.name))


__all__ = ["DataConfig", "DataSplit", "data_kind", "load_data"]
