"""The tabular density-estimation benchmarks: POWER, GAS, HEPMASS, MINIBOONE, BSDS300.

These five data sets, with the preprocessing and train / validation / test splits of
Papamakarios et al. (2017), are the standard comparison of density models since MAF
(NAF, FFJORD, neural spline flows, ... report on them). The files are those of the
public archive (``data.tar.gz``, Zenodo record 1161203, md5 below), which holds the
raw sources already reduced as the MAF paper describes; the steps below turn them into
the benchmark:

* **POWER** (``power/data.npy``, household electric power): rows shuffled
  (``RandomState(42)``), the reactive-power and intensity columns (1 and 3) dropped,
  uniform noise added to break ties (``0.001``, ``0.01``, ``1``, ``1``, ``1`` wide on
  the remaining columns, none on time), the last 10 % as test, the last 10 % of the
  rest as validation, standardised by the mean and std of training + validation rows.
  6 dimensions.
* **GAS** (``gas/ethylene_CO.pickle``, a pandas data frame of chemical sensors): the
  ``Meth``, ``Eth`` and ``Time`` columns dropped, then repeatedly the first column with
  a correlation above 0.98 to another one, standardised over all rows (std with
  ``ddof=1``), split as POWER without shuffling. 8 dimensions.
* **HEPMASS** (``hepmass/1000_train.csv``, ``1000_test.csv``, particle physics at mass
  1000): signal rows only (first column ``== 1``), that label column dropped (and the
  test file's extra last column), standardised by the training rows (``ddof=1``),
  features whose smallest value recurs more than 5 times dropped, the last 10 % of the
  training rows as validation. 21 dimensions.
* **MINIBOONE** (``miniboone/data.npy``, particle identification): split as POWER
  without shuffling, standardised by training + validation. 43 dimensions.
* **BSDS300** (``BSDS300/BSDS300.hdf5``, 8x8 natural-image patches with the last pixel
  dropped): the file's own ``train`` / ``validation`` / ``test`` sets. 63 dimensions.

GAS and HEPMASS need ``pandas`` and BSDS300 ``h5py`` (``pip install resflow[tabular]``).
The GAS file is a pickle: load it only from the verified archive or a source you trust.

A loader looks for ``<name folder>/<file>`` in ``data_dir``, ``data_dir/data`` and
``data_dir/maf/data`` (so the unpacked archive can be used where it is). With
``download=True`` a missing file is extracted from ``data_dir/data.tar.gz``, which is
downloaded first when it is not there (about 0.8 GB), checked against its md5.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from resflow.data.download import RemoteFile, download_remote, matches_remote
from resflow.data.tabular import TabularData

__all__ = [
    "ARCHIVE",
    "BENCHMARKS",
    "REFERENCE_LOG_LIKELIHOOD",
    "TabularBenchmark",
    "load_benchmark",
]

#: The archive of Papamakarios et al. (2017), "Preprocessed datasets for MAF experiments".
ARCHIVE = RemoteFile(
    "data.tar.gz",
    "https://zenodo.org/record/1161203/files/data.tar.gz",
    "9b9c9b0375315ad270eba4ce80c093ab",
)

#: Test log-likelihood in nats of NAF-DDSF with 5 flows (Huang et al. 2018, Table 2; with
#: 10 flows GAS reaches 11.96).
REFERENCE_LOG_LIKELIHOOD = {
    "power": 0.62,
    "gas": 11.91,
    "hepmass": -15.09,
    "miniboone": -8.86,
    "bsds300": 157.73,
}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class TabularBenchmark:
    """One benchmark: its files (relative to the archive's ``data/`` folder), its
    dimension and split sizes after preprocessing, and the preprocessing itself."""

    name: str
    files: tuple[str, ...]
    dim: int
    sizes: tuple[int, int, int]
    prepare: Callable[[list[Path]], Arrays]
    needs: str | None = None


def _last_tenth(data: np.ndarray) -> Arrays:
    """The last 10 % as test, the last 10 % of the rest as validation."""
    n_test = int(0.1 * data.shape[0])
    test, rest = data[-n_test:], data[:-n_test]
    n_val = int(0.1 * rest.shape[0])
    return rest[:-n_val], rest[-n_val:], test


def _standardize_by_train_and_valid(train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Arrays:
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _check_columns(data: np.ndarray, n: int, path: Path) -> None:
    if data.ndim != 2 or data.shape[1] != n:
        raise ValueError(
            f"{path}: expected a table of {n} columns, got shape {tuple(data.shape)}; is this "
            "the file of the MAF archive?"
        )


def _prepare_power(paths: list[Path]) -> Arrays:
    data = np.load(paths[0], allow_pickle=False).astype(np.float64)
    _check_columns(data, 8, paths[0])
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    # active power, voltage, 3 sub-meterings, time
    voltage, active = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1)
    metering, time = rng.rand(n, 3), np.zeros((n, 1))
    data = data + np.hstack((active, voltage, metering, time))
    return _standardize_by_train_and_valid(*_last_tenth(data))


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            "this data set needs pandas to read its files: pip install pandas "
            "(or pip install 'resflow[tabular]')"
        ) from None
    return pd


def _prepare_gas(paths: list[Path]) -> Arrays:
    pd = _pandas()
    try:
        frame = pd.read_pickle(paths[0])
    except Exception as err:  # a pickle from an old pandas that this one cannot read
        raise ValueError(
            f"{paths[0]}: pandas {pd.__version__} could not read this pickle ({err}); it was "
            "written by an old pandas, so an older pandas (e.g. pip install 'pandas<2') may"
        ) from err
    missing = [c for c in ("Meth", "Eth", "Time") if c not in frame.columns]
    if missing:
        raise ValueError(f"{paths[0]}: no column(s) {missing}; is this the MAF archive's file?")
    frame = frame.drop(columns=["Meth", "Eth", "Time"])
    while True:
        correlated = (frame.corr() > 0.98).to_numpy().sum(axis=1) > 1  # itself counts once
        if not correlated.any():
            break
        frame = frame.drop(columns=frame.columns[int(np.flatnonzero(correlated)[0])])
    frame = (frame - frame.mean()) / frame.std()
    return _last_tenth(frame.to_numpy(dtype=np.float64))


def _prepare_hepmass(paths: list[Path]) -> Arrays:
    pd = _pandas()
    train = pd.read_csv(paths[0], index_col=False)
    test = pd.read_csv(paths[1], index_col=False)
    train = train[train[train.columns[0]] == 1].drop(columns=train.columns[0])
    test = test[test[test.columns[0]] == 1].drop(columns=test.columns[0])
    if test.shape[1] == train.shape[1] + 1:  # the test file has one column more
        test = test.drop(columns=test.columns[-1])
    if test.shape[1] != train.shape[1] or train.empty or test.empty:
        raise ValueError(
            f"{paths[0].parent}: the HEPMASS files do not match ({train.shape[1]} training "
            f"and {test.shape[1]} test feature columns, {len(train)} and {len(test)} signal "
            "rows)"
        )
    mu, s = train.mean(), train.std()
    tr = ((train - mu) / s).to_numpy(dtype=np.float64)
    te = ((test - mu) / s).to_numpy(dtype=np.float64)
    keep = []
    for i in range(tr.shape[1]):  # drop features whose smallest value recurs > 5 times
        values, counts = np.unique(tr[:, i], return_counts=True)
        keep.append(counts[0] <= 5)
    tr, te = tr[:, keep], te[:, keep]
    n_val = int(0.1 * tr.shape[0])
    return tr[:-n_val], tr[-n_val:], te


def _prepare_miniboone(paths: list[Path]) -> Arrays:
    data = np.load(paths[0], allow_pickle=False).astype(np.float64)
    _check_columns(data, 43, paths[0])
    return _standardize_by_train_and_valid(*_last_tenth(data))


def _prepare_bsds300(paths: list[Path]) -> Arrays:
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "BSDS300 needs h5py to read its file: pip install h5py (or pip install "
            "'resflow[tabular]')"
        ) from None
    with h5py.File(paths[0], "r") as f:
        missing = [k for k in ("train", "validation", "test") if k not in f]
        if missing:
            raise ValueError(f"{paths[0]}: no data set(s) {missing} in the HDF5 file")
        parts = [np.asarray(f[k], dtype=np.float64) for k in ("train", "validation", "test")]
    for i, part in enumerate(parts):
        if part.ndim == 2 and part.shape[1] == 64:  # whole patches: drop the last pixel
            parts[i] = part[:, :63]
        _check_columns(parts[i], 63, paths[0])
    return parts[0], parts[1], parts[2]


#: The benchmarks by name, with the split sizes of the archive's files.
BENCHMARKS: dict[str, TabularBenchmark] = {
    b.name: b
    for b in (
        TabularBenchmark(
            "power", ("power/data.npy",), 6, (1_659_917, 184_435, 204_928), _prepare_power
        ),
        TabularBenchmark(
            "gas",
            ("gas/ethylene_CO.pickle",),
            8,
            (852_174, 94_685, 105_206),
            _prepare_gas,
            "pandas",
        ),
        TabularBenchmark(
            "hepmass",
            ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
            21,
            (315_123, 35_013, 174_987),
            _prepare_hepmass,
            "pandas",
        ),
        TabularBenchmark(
            "miniboone", ("miniboone/data.npy",), 43, (29_556, 3_284, 3_648), _prepare_miniboone
        ),
        TabularBenchmark(
            "bsds300",
            ("BSDS300/BSDS300.hdf5",),
            63,
            (1_000_000, 50_000, 250_000),
            _prepare_bsds300,
            "h5py",
        ),
    )
}

_ROOTS = (".", "data", "maf/data")


def _find(bench: TabularBenchmark, data_dir: Path) -> list[Path] | None:
    for root in _ROOTS:
        paths = [data_dir / root / f for f in bench.files]
        if all(p.is_file() for p in paths):
            return paths
    return None


def _extract(archive: Path, members: tuple[str, ...], dest: Path) -> None:
    """Extract ``data/<member>`` of ``archive`` to ``dest/data/<member>``, each through a
    temporary file (no partial file under the final name; regular files only)."""
    wanted = {f"data/{m}" for m in members}
    found: set[str] = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name).as_posix().removeprefix("./")
                if name not in wanted or not member.isfile():
                    continue
                target = dest.joinpath(*PurePosixPath(name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
                try:
                    src = tar.extractfile(member)
                    assert src is not None  # a regular file
                    with src, os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.replace(tmp, target)
                finally:
                    Path(tmp).unlink(missing_ok=True)
                found.add(name)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ValueError(
            f"{archive} is not a valid archive ({err}); delete it and download it again"
        ) from err
    if found != wanted:
        raise ValueError(f"{archive} lacks {sorted(wanted - found)}; is it the MAF archive?")


def _locate(
    bench: TabularBenchmark, data_dir: Path | None, download: bool, progress: bool
) -> list[Path]:
    if data_dir is not None:
        paths = _find(bench, data_dir)
        if paths is not None:
            return paths
    where = "no data_dir given" if data_dir is None else f"looked in {data_dir}"
    if not download or data_dir is None:
        raise FileNotFoundError(
            f"{bench.name.upper()} is not here ({where}, for {', '.join(bench.files)} below "
            f"{', '.join(_ROOTS)}). Pass --download with --data-dir to fetch the MAF archive "
            f"({ARCHIVE.url}, md5 {ARCHIVE.md5}, about 0.8 GB), or unpack that archive into "
            "--data-dir yourself"
        )
    archive = data_dir / ARCHIVE.filename
    if not matches_remote(archive, ARCHIVE):
        download_remote(ARCHIVE, data_dir, progress=progress)
    _extract(archive, bench.files, data_dir)
    paths = _find(bench, data_dir)
    assert paths is not None
    return paths


def load_benchmark(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    progress: bool = True,
) -> TabularData:
    """Load one benchmark, preprocessed and split as in the MAF paper (see the module
    docstring for each data set's steps).

    Returns:
        a :class:`~resflow.data.tabular.TabularData` of ``float32`` splits (already
        standardised by the benchmark's own rule; ``mean`` and ``std`` are zeros and ones).

    Raises:
        ValueError: unknown name; files of the wrong format (with what was expected).
        FileNotFoundError: the files are not in ``data_dir`` and ``download`` is off (the
            message says where they were looked for and how to get them).
        resflow.data.download.DownloadError: the download failed (e.g. no network).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown tabular benchmark {name!r}; choose from {list(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    root = None if data_dir is None else Path(data_dir).expanduser()
    paths = _locate(bench, root, download, progress)
    train, val, test = bench.prepare(paths)
    for part, what in ((train, "training"), (val, "validation"), (test, "test")):
        if part.shape[1] != bench.dim:
            raise ValueError(
                f"{name.upper()}: preprocessing left {part.shape[1]} dimensions in the {what} "
                f"split, expected {bench.dim}; are these the MAF archive's files?"
            )
        if not np.isfinite(part).all():
            raise ValueError(f"{name.upper()}: the {what} split has non-finite values")
    sizes = (len(train), len(val), len(test))
    if sizes != bench.sizes:
        warnings.warn(
            f"{name.upper()} has {sizes} train/validation/test rows, the archive's files give "
            f"{bench.sizes}: results are not comparable with published ones",
            stacklevel=2,
        )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)

    d = bench.dim
    return TabularData(t(train), t(val), t(test), torch.zeros(d), torch.ones(d), name)
