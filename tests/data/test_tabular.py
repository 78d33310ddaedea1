"""Tests for resflow.data.tabular: loading, splitting and standardising matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resflow.data.tabular import TabularData, load_matrix, load_tabular, split_tabular


@pytest.fixture
def mat() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(50, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([0.0, 5.0, -2.0])


def test_npy_round_trip(tmp_path: Path, mat: np.ndarray) -> None:
    p = tmp_path / "m.npy"
    np.save(p, mat)
    x = load_matrix(p)
    assert x.dtype == torch.float32 and x.shape == (50, 3)
    np.testing.assert_allclose(x.numpy(), mat, rtol=1e-6)
    np.save(p, np.arange(6, dtype=np.int64).reshape(3, 2))  # integer arrays are numeric
    assert load_matrix(str(p)).tolist() == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("delim", [",", " ", "\t"])
@pytest.mark.parametrize("header", [False, True])
def test_text_round_trip(tmp_path: Path, mat: np.ndarray, delim: str, header: bool) -> None:
    p = tmp_path / ("m.csv" if delim == "," else "m.txt")
    hdr = delim.join(["a", "b", "c"]) if header else ""
    np.savetxt(p, mat, delimiter=delim, header=hdr, comments="", fmt="%.10g")
    x = load_matrix(p)
    assert x.shape == (50, 3)
    np.testing.assert_allclose(x.numpy(), mat, rtol=1e-6)


def test_text_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("# a comment\nx, y\n\n1, 2\n3,4\n")
    assert load_matrix(p).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_split_sizes_deterministic_and_disjoint() -> None:
    x = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    d = split_tabular(x, val_frac=0.1, test_frac=0.2, seed=3, standardize=False)
    assert isinstance(d, TabularData)
    assert (len(d.train), len(d.val), len(d.test)) == (70, 10, 20)
    assert d.dim == 2 and d.name == "user"
    rows = torch.cat([d.train, d.val, d.test])[:, 0].tolist()
    assert sorted(rows) == x[:, 0].tolist()  # a permutation: disjoint and complete
    assert torch.equal(d.mean, torch.zeros(2)) and torch.equal(d.std, torch.ones(2))
    again = split_tabular(x, val_frac=0.1, test_frac=0.2, seed=3, standardize=False)
    assert torch.equal(d.test, again.test)
    other = split_tabular(x, val_frac=0.1, test_frac=0.2, seed=4, standardize=False)
    assert not torch.equal(d.test, other.test)


def test_standardisation_uses_train_stats_only(mat: np.ndarray) -> None:
    x = torch.from_numpy(mat)
    x[:5] += 1000.0  # rows whose shift would show up in the stats if they were used
    d = split_tabular(x, seed=0, name="toy")
    raw_train = d.unstandardize(d.train).double()
    np.testing.assert_allclose(d.mean.numpy(), raw_train.mean(0).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d.std.numpy(), raw_train.std(0, unbiased=False).numpy(), rtol=1e-4)
    np.testing.assert_allclose(d.train.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.train.std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    # val / test are transformed with the same (train) statistics, not their own.
    for split in (d.val, d.test):
        back = d.unstandardize(split).double().numpy()
        assert np.isin(np.round(back[:, 0], 3), np.round(x[:, 0].numpy(), 3)).all()
    assert d.name == "toy"


def test_load_tabular(tmp_path: Path, mat: np.ndarray) -> None:
    p = tmp_path / "power.npy"
    np.save(p, mat)
    d = load_tabular(p, val_frac=0.2, test_frac=0.2, seed=1)
    assert d.name == "power"
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 10)


# --- bad inputs ---------------------------------------------------------------------------


def test_missing_file_and_bad_extension(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_matrix(tmp_path / "absent.csv")
    p = tmp_path / "m.parquet"
    p.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"unsupported file extension '\.parquet'.*\.npy"):
        load_matrix(p)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_wrong_ndim(tmp_path: Path, shape: tuple[int, ...]) -> None:
    p = tmp_path / "m.npy"
    np.save(p, np.zeros(shape))
    with pytest.raises(ValueError, match=f"must be a 2-D array.*got a {len(shape)}-D array"):
        load_matrix(p)
    with pytest.raises(ValueError, match=f"got a {len(shape)}-D array"):
        split_tabular(torch.zeros(shape))


def test_non_numeric_npy(tmp_path: Path) -> None:
    p = tmp_path / "m.npy"
    np.save(p, np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ValueError, match="non-numeric array"):
        load_matrix(p)


def test_non_numeric_cell(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(ValueError, match=r"non-numeric value 'oops' at line 3, column 2"):
        load_matrix(p)
    p.write_text("1,oops\n3,4\n")  # a partly numeric first row is data, not a header
    with pytest.raises(ValueError, match=r"'oops' at line 1, column 2"):
        load_matrix(p)


def test_ragged_rows(tmp_path: Path) -> None:
    p = tmp_path / "m.txt"
    p.write_text("1 2\n3 4 5\n")
    with pytest.raises(ValueError, match="line 2 has 3 column"):
        load_matrix(p)


def test_non_finite_values(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("1,2\n3,nan\ninf,4\nnan,5\n")
    with pytest.raises(ValueError, match=r"3 non-finite value.*row 1, column 1"):
        load_matrix(p)
    x = torch.ones(20, 3)
    x[4, 2] = float("inf")
    with pytest.raises(ValueError, match=r"1 non-finite value.*row 4, column 2"):
        split_tabular(x)


def test_too_few_rows() -> None:
    with pytest.raises(ValueError, match="too few rows to split: 3 row"):
        split_tabular(torch.randn(3, 2))
    split_tabular(torch.randn(4, 2))  # 1 val + 1 test + 2 train is enough


def test_constant_columns() -> None:
    x = torch.randn(40, 5)
    x[:, 1] = 3.0
    x[:, 4] = 0.0
    with pytest.raises(ValueError, match=r"column\(s\) \[1, 4\].*constant.*std would be 0"):
        split_tabular(x)
    d = split_tabular(x, standardize=False)
    assert torch.equal(d.std, torch.ones(5))


def test_bad_fractions() -> None:
    with pytest.raises(ValueError, match="val_frac must be in"):
        split_tabular(torch.randn(10, 2), val_frac=1.5)
    with pytest.raises(ValueError, match="val_frac \\+ test_frac must be < 1"):
        split_tabular(torch.randn(10, 2), val_frac=0.5, test_frac=0.5)
