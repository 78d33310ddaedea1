"""The tabular benchmarks on synthetic files of the archive's shapes and formats: the
preprocessing steps, the splits, the search folders, the archive extraction and the
errors."""

from __future__ import annotations

import hashlib
import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from resflow.data import data_kind, load_data
from resflow.data import tabular_benchmarks as tb
from resflow.data.download import RemoteFile
from resflow.data.tabular_benchmarks import BENCHMARKS, load_benchmark

pd = pytest.importorskip("pandas")
h5py = pytest.importorskip("h5py")


def _load(name: str, root: Path, **kw):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not comparable with published")
        return load_benchmark(name, root, **kw)


def _power(root: Path, n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(n, 8)) * np.arange(1, 9) + 10 * np.arange(8)
    raw[:, 4:7] = rng.integers(0, 5, size=(n, 3))  # sub-meterings: integers (Wh)
    (root / "power").mkdir(parents=True)
    np.save(root / "power" / "data.npy", raw)
    return raw


def test_power_steps_and_splits(tmp_path: Path) -> None:
    raw = _power(tmp_path)
    data = _load("power", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (810, 90, 100)
    assert data.dim == 6
    both = np.vstack((data.train.numpy(), data.val.numpy())).astype(np.float64)
    np.testing.assert_allclose(both.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(both.std(0), 1, atol=1e-5)
    # rows shuffled by RandomState(42), columns 1 and 3 dropped; time (last) noise-free,
    # the others carry noise (the sub-meterings become continuous)
    kept = raw[np.random.RandomState(42).permutation(len(raw))][:, [0, 2, 4, 5, 6, 7]]
    out = np.vstack((both, data.test.numpy()))
    for j in range(6):
        corr = np.corrcoef(kept[:, j], out[:, j])[0, 1]
        assert corr > 0.9, j
        if j == 5:
            assert corr > 1 - 1e-9
        else:
            assert corr < 1 - 1e-9, j
    assert len(np.unique(out[:, 2])) > 900  # dequantized sub-metering
    again = _load("power", tmp_path)
    assert np.array_equal(again.test.numpy(), data.test.numpy())  # deterministic


def test_gas_drops_correlated_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 500
    base = rng.normal(size=(n, 8)) * 3 + 1
    cols = {"Time": np.arange(n), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n)}
    for j in range(8):  # a near copy of each sensor comes first: it is the one dropped
        cols[f"copy{j}"] = base[:, j] + 1e-3 * rng.normal(size=n)
        cols[f"sensor{j}"] = base[:, j]
    (tmp_path / "gas").mkdir()
    pd.DataFrame(cols).to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    data = _load("gas", tmp_path)
    assert data.dim == 8 and (len(data.train), len(data.val), len(data.test)) == (405, 45, 50)
    expected = (base - base.mean(0)) / base.std(0, ddof=1)  # over all rows, no shuffle
    np.testing.assert_allclose(data.test.numpy(), expected[-50:], atol=1e-5)
    np.testing.assert_allclose(data.train.numpy(), expected[:405], atol=1e-5)


def _hepmass_csv(path: Path, n: int, rng: np.random.Generator, extra: bool) -> np.ndarray:
    label = rng.integers(0, 2, size=n)
    cont = rng.normal(size=(n, 21))
    discrete = rng.integers(0, 3, size=(n, 6)).astype(float)  # recurring values: dropped
    mass = np.full((n, 1), 1000.0)  # constant: dropped too
    table = np.hstack((label[:, None], cont[:, :10], discrete, cont[:, 10:], mass))
    header = ["# label"] + [f"f{i}" for i in range(27)] + ["mass"]
    if extra:
        table = np.hstack((table, np.zeros((n, 1))))
        header.append("extra")
    pd.DataFrame(table, columns=header).to_csv(path, index=False)
    return table


def test_hepmass_signal_rows_recurring_features_and_validation(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "data" / "hepmass").mkdir(parents=True)  # the archive's data/ folder
    train = _hepmass_csv(tmp_path / "data" / "hepmass" / "1000_train.csv", 600, rng, False)
    test = _hepmass_csv(tmp_path / "data" / "hepmass" / "1000_test.csv", 300, rng, True)
    data = _load("hepmass", tmp_path)
    signal = train[train[:, 0] == 1]
    n_val = int(0.1 * len(signal))
    assert data.dim == 21
    assert (len(data.train), len(data.val)) == (len(signal) - n_val, n_val)
    assert len(data.test) == int((test[:, 0] == 1).sum())
    feats = signal[:, [*range(1, 11), *range(17, 28)]]  # the continuous ones
    mu, s = feats.mean(0), feats.std(0, ddof=1)
    np.testing.assert_allclose(data.val.numpy(), ((feats - mu) / s)[-n_val:], atol=1e-5)
    test_feats = test[test[:, 0] == 1][:, [*range(1, 11), *range(17, 28)]]
    np.testing.assert_allclose(data.test.numpy(), (test_feats - mu) / s, atol=1e-5)


def test_miniboone_and_bsds300(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(400, 43)) * 5 + 2
    (tmp_path / "maf" / "data" / "miniboone").mkdir(parents=True)
    np.save(tmp_path / "maf" / "data" / "miniboone" / "data.npy", raw)
    data = _load("miniboone", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (324, 36, 40)
    both = raw[:360]
    np.testing.assert_allclose(data.test.numpy(), (raw[360:] - both.mean(0)) / both.std(0),
                               atol=1e-5)  # fmt: skip

    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        f["train"] = rng.normal(size=(50, 64))  # whole patches: the last pixel is dropped
        f["validation"] = rng.normal(size=(10, 63))
        f["test"] = rng.normal(size=(20, 63))
    bsds = _load("bsds300", tmp_path)
    assert bsds.dim == 63 and (len(bsds.train), len(bsds.val), len(bsds.test)) == (50, 10, 20)


def test_load_data_and_names(tmp_path: Path) -> None:
    _power(tmp_path)
    assert all(data_kind(n) == "vector" for n in BENCHMARKS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = load_data("power", data_dir=tmp_path)
    assert any("not comparable with published" in str(w.message) for w in caught)
    assert split.valid is not None and split.shape == (6,) and split.levels is None
    assert [BENCHMARKS[n].dim for n in BENCHMARKS] == [6, 8, 21, 43, 63]


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"POWER is not here.*--download.*zenodo"):
        load_benchmark("power", tmp_path)
    with pytest.raises(FileNotFoundError, match="no data_dir given"):
        load_benchmark("gas", None, download=True)
    with pytest.raises(ValueError, match="unknown tabular benchmark"):
        load_benchmark("powerr", tmp_path)
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", np.zeros((10, 5)))
    with pytest.raises(ValueError, match="expected a table of 43 columns"):
        load_benchmark("miniboone", tmp_path)


def _archive(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    raw = np.random.default_rng(4).normal(size=(200, 43))
    buf = io.BytesIO()
    np.save(buf, raw)
    path = src / "data.tar.gz"
    src.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("data/miniboone/data.npy", buf.getvalue()), ("../evil", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_download_verifies_and_extracts_only_what_is_needed(tmp_path, monkeypatch):
    archive = _archive(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "root"
    monkeypatch.setattr(tb, "ARCHIVE", RemoteFile("data.tar.gz", archive.as_uri(), md5))
    data = _load("miniboone", root, download=True, progress=False)
    assert data.dim == 43 and (root / "data" / "miniboone" / "data.npy").is_file()
    assert not (tmp_path / "evil").exists() and not (root / "evil").exists()
    assert sorted(p.name for p in root.iterdir()) == ["data", "data.tar.gz"]

    bad = tmp_path / "root2"
    monkeypatch.setattr(tb, "ARCHIVE", RemoteFile("data.tar.gz", archive.as_uri(), "0" * 32))
    with pytest.raises(ValueError, match="md5 mismatch"):
        load_benchmark("miniboone", bad, download=True, progress=False)
    assert not (bad / "data.tar.gz").exists()  # nothing half-written


def test_unreadable_gas_pickle_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="could not read this pickle"):
        load_benchmark("gas", tmp_path)
