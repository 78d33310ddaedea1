"""Data sets: 2-D toy densities, tabular matrices and images, behind one entry point.

:func:`load_data` returns a :class:`DataSplit` (train / test tensors, name, levels)
for any data set name: a toy density (``8gaussians`` ...), an image data set
(``digits``, ``mnist`` ...) or a user's matrix file (``.npy`` / ``.csv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class DataSplit:
    """Training and test data: float ``[N, D]`` vectors or integer ``[N, C, H, W]`` images
    with ``levels`` quantization levels (``None`` for continuous data)."""

    train: Tensor
    test: Tensor
    name: str = "data"
    levels: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def load_data(
    name: str,
    data_dir: str | Path | None = None,
    *,
    n_train: int = 50_000,
    n_test: int = 10_000,
    seed: int = 0,
    download: bool = False,
    n_bits: int | None = None,
    image_size: int | None = None,
    path: str | Path | None = None,
) -> DataSplit:
    """Load a data set by name.

    * toy 2-D densities (:data:`resflow.data.toy2d.TOY_DATASETS`): ``n_train`` and
      ``n_test`` fresh samples (seeds ``seed`` and ``seed + 1``);
    * images (:data:`resflow.data.images.DATASETS`): see
      :func:`resflow.data.images.load_images`;
    * a path to a ``.npy`` / ``.csv`` / ``.txt`` matrix: standardised tabular data
      (:func:`resflow.data.tabular.load_tabular`), validation rows kept out.
    """
    from resflow.data.images import DATASETS, load_images
    from resflow.data.toy2d import TOY_DATASETS, sample_toy

    if name in TOY_DATASETS:
        g_train = torch.Generator().manual_seed(seed)
        g_test = torch.Generator().manual_seed(seed + 1)
        return DataSplit(sample_toy(name, n_train, g_train), sample_toy(name, n_test, g_test), name)
    if name in DATASETS:
        kw = dict(download=download, n_bits=n_bits, image_size=image_size, path=path)
        train = load_images(name, "train", data_dir, **kw)  # type: ignore[arg-type]
        test = load_images(name, "test", data_dir, **kw)  # type: ignore[arg-type]
        return DataSplit(train.images, test.images, name, train.levels)
    if Path(name).suffix.lower() in (".npy", ".csv", ".txt"):
        from resflow.data.tabular import load_tabular

        tab = load_tabular(name)
        return DataSplit(tab.train, tab.test, tab.name)
    raise ValueError(
        f"unknown data set {name!r}: use a toy density {list(TOY_DATASETS)}, an image data "
        f"set {list(DATASETS)}, or a path to a .npy/.csv matrix"
    )
