"""Tabular (vector) datasets: load a numeric matrix, split it, and standardise it.

A dataset is an ``[N, D]`` matrix of real numbers, one example per row. It is read from a
``.npy`` file (a 2-D numeric array) or a ``.csv`` / ``.txt`` text file (comma- or
whitespace-delimited, with an optional header row of non-numeric names that is detected
automatically), split
at random into train / validation / test rows, and standardised per column with the mean
and standard deviation of the *training* rows only.

Every malformed input raises a :class:`ValueError` that says what is wrong and where.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TabularData", "load_matrix", "load_tabular", "split_tabular"]

_TEXT_SUFFIXES = (".csv", ".txt")
_SUFFIXES = (".npy", *_TEXT_SUFFIXES)


@dataclass
class TabularData:
    """A split, optionally standardised tabular dataset.

    Attributes:
        train, val, test: ``float32`` tensors ``[N_split, D]`` (standardised when the
            dataset was split with ``standardize=True``).
        mean, std: ``float32`` ``[D]`` statistics of the raw training rows, so that
            ``raw = data * std + mean``; zeros and ones when not standardised.
        name: a label for the dataset.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    mean: Tensor
    std: Tensor
    name: str

    @property
    def dim(self) -> int:
        """Number of columns ``D``."""
        return int(self.train.shape[1])

    def unstandardize(self, x: Tensor) -> Tensor:
        """Map standardised rows back to the original units: ``x * std + mean``."""
        return x * self.std.to(x) + self.mean.to(x)


def _check_2d_finite(arr: np.ndarray, what: str) -> None:
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D array (rows = examples, columns = features), got a "
            f"{arr.ndim}-D array of shape {tuple(arr.shape)}"
        )
    bad = ~np.isfinite(arr)
    count = int(bad.sum())
    if count:
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what} contains {count} non-finite value(s) (NaN or inf); the first is "
            f"{arr[r, c]!r} at row {r}, column {c} (0-based)"
        )


def _parse_text(path: Path) -> np.ndarray:
    with path.open("r", encoding="utf-8") as f:
        lines = [(i + 1, ln.strip()) for i, ln in enumerate(f)]
    lines = [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{path} contains no data rows")
    comma = any("," in ln for _, ln in lines)

    def cells(ln: str) -> list[str]:
        return [c.strip() for c in ln.split(",")] if comma else ln.split()

    def to_float(cell: str) -> float | None:
        try:
            return float(cell)
        except ValueError:
            return None

    rows = [(i, cells(ln)) for i, ln in lines]
    # Header: the first row is a header when none of its cells is a number. (A first row
    # with only *some* non-numeric cells is treated as data and reported as malformed,
    # rather than silently dropped.)
    first_line, first = rows[0]
    if all(to_float(c) is None for c in first):
        rows = rows[1:]
        if not rows:
            raise ValueError(f"{path} has a header row (line {first_line}) but no data rows")
    width = len(rows[0][1])
    out = np.empty((len(rows), width), dtype=np.float64)
    for r, (line_no, row) in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"{path}: line {line_no} has {len(row)} column(s), expected {width} "
                f"(as on line {rows[0][0]})"
            )
        for c, cell in enumerate(row):
            v = to_float(cell)
            if v is None:
                raise ValueError(
                    f"{path}: non-numeric value {cell!r} at line {line_no}, column {c + 1} "
                    f"(1-based; data row {r}, column {c} 0-based)"
                )
            out[r, c] = v
    return out


def load_matrix(path: str | Path) -> Tensor:
    """Read a 2-D numeric matrix from a ``.npy``, ``.csv`` or ``.txt`` file.

    Text files may be comma- or whitespace-delimited (comma when any line contains a
    comma); blank lines and lines starting with ``#`` are skipped; the first row is taken
    as a header when none of its cells parses as a number.

    Returns:
        ``float32`` tensor ``[N, D]``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown extension; an array that is not 2-D or not numeric; a
            non-numeric cell (with its line and column); rows of different lengths;
            NaN / inf values (with their count and the first position).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"unsupported file extension {path.suffix!r} for {path}; expected one of "
            f"{', '.join(_SUFFIXES)}"
        )
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:  # object arrays need pickle
            raise ValueError(f"{path} does not hold a numeric array: {e}") from e
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{path} holds a non-numeric array of dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    else:
        arr = _parse_text(path)
    _check_2d_finite(arr, str(path))
    out = torch.from_numpy(arr).to(torch.float32)
    if not torch.isfinite(out).all():
        raise ValueError(f"{path} has values too large for float32")
    return out


def split_tabular(
    x: Tensor | np.ndarray,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    standardize: bool = True,
    name: str = "user",
) -> TabularData:
    """Randomly split the rows of ``x`` into train / val / test and standardise them.

    The split sizes are ``round(N * val_frac)`` and ``round(N * test_frac)`` (at least 1
    when the fraction is positive); the remaining rows are the training set, which must
    keep at least 2 rows. Rows are shuffled with ``torch.randperm`` seeded by ``seed``, so
    the split is a deterministic function of ``(N, seed)``.

    With ``standardize=True`` every split is mapped by ``(x - mean) / std`` using the
    per-column mean and (population) standard deviation of the training rows only.

    Raises:
        ValueError: ``x`` not 2-D or not finite; bad fractions; too few rows to split;
            columns that are constant on the training rows when standardising (their
            indices are listed; std would be 0).
    """
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"x must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    _check_2d_finite(arr, "x")
    for label, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {frac}")
    if val_frac + test_frac >= 1.0:
        raise ValueError(f"val_frac + test_frac must be < 1, got {val_frac + test_frac}")

    n = arr.shape[0]
    n_val = max(1, round(n * val_frac)) if val_frac > 0 else 0
    n_test = max(1, round(n * test_frac)) if test_frac > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 2:
        raise ValueError(
            f"too few rows to split: {n} row(s) with val_frac={val_frac}, "
            f"test_frac={test_frac} leave {n_train} training row(s); need at least 2"
        )

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).numpy()
    test_idx, val_idx, train_idx = np.split(perm, [n_test, n_test + n_val])
    train, val, test = arr[train_idx], arr[val_idx], arr[test_idx]

    d = arr.shape[1]
    mean, std = np.zeros(d), np.ones(d)
    if standardize:
        mean = train.mean(axis=0)
        std = train.std(axis=0)
        # Constant up to float rounding: std tiny compared with the column's magnitude.
        const = std <= 1e-12 * np.maximum(np.abs(mean), 1.0)
        if const.any():
            cols = [int(c) for c in np.flatnonzero(const)]
            raise ValueError(
                f"cannot standardize: column(s) {cols} (0-based) are constant on the "
                f"training rows, so their std would be 0; drop them or pass "
                f"standardize=False"
            )
        train, val, test = ((a - mean) / std for a in (train, val, test))

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)

    return TabularData(
        train=t(train), val=t(val), test=t(test), mean=t(mean), std=t(std), name=name
    )


def load_tabular(path: str | Path, **kwargs: Any) -> TabularData:
    """:func:`load_matrix` followed by :func:`split_tabular` (keyword arguments go to the
    latter); ``name`` defaults to the file's stem."""
    kwargs.setdefault("name", Path(path).stem)
    return split_tabular(load_matrix(path), **kwargs)
