"""The loaded data set: :class:`DataSplit` (train / validation / test tensors and labels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from resflow.data.config import DataConfig


@dataclass
class DataSplit:
    """Training, validation and test data: float ``[N, D]`` vectors or integer
    ``[N, C, H, W]`` images with ``levels`` quantization levels (``None`` for
    continuous data); ``*_labels`` are ``int64 [N]`` class labels or ``None``;
    ``*_context`` real ``[N, k]`` vectors the data are conditioned on (a matrix file's
    context columns) or ``None``.
    ``config`` is what loaded it (``None`` for a split built by hand).

    >>> split = DataSplit(torch.zeros(6, 2), torch.zeros(3, 2), "toy")
    >>> split.shape, split.n_classes
    ((2,), None)
    """

    train: Tensor
    test: Tensor
    name: str = "data"
    levels: int | None = None
    valid: Tensor | None = None
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    valid_labels: Tensor | None = None
    config: DataConfig | None = None
    train_context: Tensor | None = None
    test_context: Tensor | None = None
    valid_context: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def context_features(self) -> int:
        """Size of the context vectors (0: none)."""
        return 0 if self.train_context is None else int(self.train_context.shape[1])

    @property
    def n_classes(self) -> int | None:
        """Number of classes (from the labels), ``None`` without labels."""
        if self.train_labels is None:
            return None
        return int(self.train_labels.max()) + 1


def carve_valid(split: DataSplit, n_valid: int, seed: int) -> DataSplit:
    """Hold out ``n_valid`` random training examples as the validation part."""
    if n_valid == 0:
        return split
    n = len(split.train)
    if n_valid >= n:
        raise ValueError(f"n_valid={n_valid} leaves no training data (the training set has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    keep, held = perm[n_valid:].sort().values, perm[:n_valid].sort().values
    labels, context = split.train_labels, split.train_context
    split.valid, split.train = split.train[held], split.train[keep]
    if labels is not None:
        split.valid_labels, split.train_labels = labels[held], labels[keep]
    if context is not None:
        split.valid_context, split.train_context = context[held], context[keep]
    return split
