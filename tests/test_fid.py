"""The Fréchet distance against closed forms, and clear errors where the FID extra is missing."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from resflow.fid import (
    FIDUnavailableError,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_features,
)
from test_cli import FIXTURES, resflow


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).pow(2).sum() + (v1.sqrt() - v2.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, v1.diag(), mu2, v2.diag()) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, v1.diag(), mu1, v1.diag()) == pytest.approx(0.0, abs=1e-10)


def test_non_commuting_covariances_match_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(5, 5, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    mu1 = torch.randn(5, generator=g, dtype=torch.float64)
    mu2 = torch.randn(5, generator=g, dtype=torch.float64)
    root = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((mu1 - mu2).pow(2).sum()) + float(s1.trace() + s2.trace()) - 2 * root.trace()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_features_of_known_gaussians_give_the_closed_form():
    g = torch.Generator().manual_seed(1)
    n, d = 200_000, 4
    mu2 = torch.tensor([0.5, 0.0, -0.5, 1.0], dtype=torch.float64)
    scale2 = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * scale2 + mu2
    expected = float(mu2.pow(2).sum() + (1 - scale2).pow(2).sum())  # = 0.75 + 1.25
    assert fid_from_features(a, b) == pytest.approx(expected, abs=0.03)
    mu, cov = feature_statistics(b)
    torch.testing.assert_close(cov.diag(), scale2**2, atol=0.03, rtol=0.03)
    with pytest.raises(ValueError, match="expected features"):
        feature_statistics(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(mu, cov, mu[:2], cov[:2, :2])


def test_missing_extra_and_missing_weights_are_clear(monkeypatch):
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(FIDUnavailableError, match=r"pip install 'resflow\[fid\]'"):
        inception_features(images, 17)

    class Offline:
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    fake = types.ModuleType("pytorch_fid.inception")
    fake.InceptionV3 = Offline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", fake)
    with pytest.raises(FIDUnavailableError, match="cannot get the Inception weights"):
        inception_features(images, 17)


def test_cli_without_the_extra_says_so_in_one_line():
    try:
        import pytorch_fid  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("the fid extra is installed here")
    bad = resflow("fid", "--run", str(FIXTURES / "img"), "--n", "4", check=False)
    assert bad.returncode == 2 and "resflow[fid]" in bad.stderr and "Traceback" not in bad.stderr
