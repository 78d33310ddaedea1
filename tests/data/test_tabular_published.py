"""The tabular benchmarks against the published preprocessing rules of Papamakarios et
al. (2017) -- written out here independently of resflow's loaders, step by step as the
MAF release applies them -- on synthetic files made so that each rule matters: POWER's
noise widths per column, GAS's correlation threshold of 0.98, HEPMASS's "smallest value
recurs more than 5 times" feature rule, BSDS300's last pixel."""

from __future__ import annotations

import warnings
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


def _split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last tenth is the test set; of the rest, the last tenth is validation."""
    n_test = int(0.1 * len(rows))
    rest, test = rows[: len(rows) - n_test], rows[len(rows) - n_test :]
    n_val = int(0.1 * len(rest))
    return rest[: len(rest) - n_val], rest[len(rest) - n_val :], test


def _reference_power(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle (seed 42), drop columns 1 and 3, add uniform noise of width 0.001 to the
    first remaining column, 0.01 to the second, 1 to the three sub-meterings, none to
    the time (drawn in the order: second, first, sub-meterings), split, and standardise
    with the training and validation rows together."""
    gen = np.random.RandomState(42)
    rows = raw.copy()
    gen.shuffle(rows)
    rows = rows[:, [0, 2, 4, 5, 6, 7]]
    n = len(rows)
    u_second, u_first, u_meter = gen.rand(n, 1), gen.rand(n, 1), gen.rand(n, 3)
    rows = rows + np.concatenate([0.001 * u_first, 0.01 * u_second, u_meter, 0 * u_first], 1)
    parts = _split(rows)
    fit = np.concatenate(parts[:2])
    return tuple((p - fit.mean(0)) / fit.std(0) for p in parts)  # type: ignore[return-value]


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
    _check(_load("power", tmp_path), _reference_power(raw))


def _reference_gas(frame):  # type: ignore[no-untyped-def]
    """Drop the two gas concentrations and the time; while some sensor correlates above
    0.98 with another, drop the first such sensor; standardise (sample s.d.); split."""
    rows = frame.drop(columns=["Meth", "Eth", "Time"])
    while True:
        partners = (rows.corr() > 0.98).to_numpy().sum(1)  # itself included
        if not (partners > 1).any():
            break
        rows = rows.drop(columns=rows.columns[int(np.argmax(partners > 1))])
    return _split(((rows - rows.mean()) / rows.std()).to_numpy())


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
    expected = _reference_gas(frame)
    assert expected[0].shape[1] == 8  # b_099 dropped, a_096 kept
    _check(_load("gas", tmp_path), expected)


def _reference_hepmass(train, test):  # type: ignore[no-untyped-def]
    """Signal rows only (label 1), the label column dropped (and the test file's extra
    last column); standardise with the training statistics; drop every feature whose
    smallest value occurs more than 5 times in training; the last tenth of the training
    rows is validation."""
    label = train.columns[0]
    train = train[train[label] == 1].drop(columns=label)
    test = test[test[label] == 1].drop(columns=[label, test.columns[-1]])
    mean, sd = train.mean(), train.std()
    tr, te = ((train - mean) / sd).to_numpy(), ((test - mean) / sd).to_numpy()
    keep = [j for j in range(tr.shape[1]) if (tr[:, j] == tr[:, j].min()).sum() <= 5]
    tr, te = tr[:, keep], te[:, keep]
    n_val = int(0.1 * len(tr))
    return tr[: len(tr) - n_val], tr[len(tr) - n_val :], te


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
    want = _reference_hepmass(*(pd.read_csv(p, index_col=False) for p in paths))
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
