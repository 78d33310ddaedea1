"""The tabular benchmarks against the published preprocessing of Papamakarios et al.
(2017), transcribed from the MAF code (``datasets/power.py``, ``gas.py``,
``hepmass.py``, ``bsds300.py``) and run on synthetic files made so that each rule
matters: POWER's noise widths per column, GAS's correlation threshold of 0.98,
HEPMASS's "smallest value recurs more than 5 times" feature rule, BSDS300's last pixel."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from resflow.data.tabular_benchmarks import load_benchmark

pd = pytest.importorskip("pandas")
h5py = pytest.importorskip("h5py")


def _load(name: str, root: Path):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not comparable with published")
        return load_benchmark(name, root)


def _split(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_test = int(0.1 * data.shape[0])
    test, data = data[-n_test:], data[0:-n_test]
    n_val = int(0.1 * data.shape[0])
    return data[0:-n_val], data[-n_val:], test


def _maf_power(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.RandomState(42)
    data = raw.copy()
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, time_noise))
    train, val, test = _split(data)
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _check(data, expected) -> None:  # type: ignore[no-untyped-def]
    for got, want in zip((data.train, data.val, data.test), expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_power_is_the_published_preprocessing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 600
    # small spreads, so that a noise width of 0.01 instead of 0.001 (or 1) shows
    raw = rng.normal(size=(n, 8)) * np.array([0.002, 1, 0.02, 1, 0.5, 0.5, 0.5, 3.0])
    raw += np.arange(8)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    _check(_load("power", tmp_path), _maf_power(raw))


def _maf_gas(frame):  # type: ignore[no-untyped-def]
    data = frame.drop(columns=["Meth", "Eth", "Time"])

    def numbers(d):  # type: ignore[no-untyped-def]
        return (d.corr() > 0.98).values.sum(axis=1)

    b = numbers(data)
    while np.any(b > 1):
        data = data.drop(columns=data.columns[np.where(b > 1)[0][0]])
        b = numbers(data)
    data = ((data - data.mean()) / data.std()).values
    return _split(data)


def test_gas_correlation_threshold_is_098(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 2000
    a, b, c = rng.normal(size=(3, n))
    cols = {"Time": np.arange(n), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n)}
    cols["a"] = a
    cols["a_096"] = 0.96 * a + np.sqrt(1 - 0.96**2) * rng.normal(size=n)  # kept
    cols["b_099"] = 0.995 * b + np.sqrt(1 - 0.995**2) * rng.normal(size=n)  # dropped
    cols["b"] = b
    cols["c"] = c
    for j in range(4):  # independent sensors, to the benchmark's 8 dimensions
        cols[f"d{j}"] = rng.normal(size=n) * (j + 1)
    frame = pd.DataFrame(cols)
    corr = frame[["a", "a_096", "b_099", "b"]].corr().to_numpy()
    assert 0.95 < corr[0, 1] < 0.97 and corr[2, 3] > 0.99  # the cases are what they say
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    expected = _maf_gas(frame)
    assert expected[0].shape[1] == 8  # b_099 dropped, a_096 kept
    _check(_load("gas", tmp_path), expected)


def _maf_hepmass(train, test):  # type: ignore[no-untyped-def]
    train = train[train[train.columns[0]] == 1].drop(columns=train.columns[0])
    test = test[test[test.columns[0]] == 1].drop(columns=test.columns[0])
    test = test.drop(columns=test.columns[-1])
    mu, s = train.mean(), train.std()
    tr, te = ((train - mu) / s).values, ((test - mu) / s).values
    remove = []
    for i, feature in enumerate(tr.T):
        counts = np.array([v for _, v in sorted(Counter(feature).items())])
        if counts[0] > 5:
            remove.append(i)
    keep = [i for i in range(tr.shape[1]) if i not in remove]
    tr, te = tr[:, keep], te[:, keep]
    n_val = int(tr.shape[0] * 0.1)
    return tr[0:-n_val], tr[-n_val:], te


def _hepmass_table(n: int, rng: np.random.Generator, extra: bool) -> pd.DataFrame:
    label = np.ones(n)
    label[::3] = 0
    feats = rng.normal(size=(n, 22))
    lo = feats.min() - 1.0
    feats[:5, 0] = lo  # smallest value 5 times: kept
    feats[:6, 1] = lo  # smallest value 6 times: dropped
    feats[:, 2] = np.round(feats[:, 2])  # recurring values, but the smallest is unique:
    feats[0, 2] = lo  # kept (only the smallest value's count matters)
    cols = {"# label": label, **{f"f{i}": feats[:, i] for i in range(22)}}
    if extra:
        cols["extra"] = np.zeros(n)
    return pd.DataFrame(cols)


def test_hepmass_feature_rule_counts_the_smallest_value(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train = _hepmass_table(900, rng, extra=False)
    train.loc[:8, "# label"] = 1.0  # the rows holding the repeated values are signal rows
    test = _hepmass_table(300, rng, extra=True)
    (tmp_path / "hepmass").mkdir()
    train.to_csv(tmp_path / "hepmass" / "1000_train.csv", index=False)
    test.to_csv(tmp_path / "hepmass" / "1000_test.csv", index=False)
    paths = [tmp_path / "hepmass" / "1000_train.csv", tmp_path / "hepmass" / "1000_test.csv"]
    want = _maf_hepmass(*(pd.read_csv(p, index_col=False) for p in paths))
    assert want[0].shape[1] == 21  # feature 1 dropped, 0 and 2 kept
    _check(_load("hepmass", tmp_path), want)


def test_bsds300_drops_the_last_pixel(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    patches = rng.normal(size=(30, 64))
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        f["train"] = patches
        f["validation"] = patches[:10, :63]
        f["test"] = patches[10:, :63]
    data = _load("bsds300", tmp_path)
    np.testing.assert_allclose(data.train.numpy(), patches[:, :63], rtol=1e-6)
    np.testing.assert_allclose(data.test.numpy(), patches[10:, :63], rtol=1e-6)
