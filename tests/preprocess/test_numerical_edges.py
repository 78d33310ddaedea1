"""Numerical edges of preprocessing: draws at the ends of ``[0, 1)`` and float rounding
must never move a dequantized point out of its bin or make a likelihood infinite."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from resflow.layers.base import Sequential
from resflow.models import MODELS, build_model
from resflow.preprocess import LogitTransform, UniformDequantizer, VariationalDequantizer

# the largest value torch.rand draws in each dtype (k * eps/2 for k < 2/eps)
RAND_MAX = {dt: 1.0 - torch.finfo(dt).eps / 2 for dt in (torch.float32, torch.float64)}


def _rand_at(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    """Make every ``torch.rand_like`` return ``value`` (a draw at an end of [0, 1))."""
    monkeypatch.setattr(torch, "rand_like", lambda t, **kw: torch.full_like(t, value, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("draw", ["zero", "max"])
def test_logistic_base_is_finite_at_both_ends_of_the_uniform_draw(monkeypatch, dtype, draw):
    """u0 = 0 (once per 2**24 float32 draws) gave eps = log 0 = -inf and a NaN density."""
    _rand_at(monkeypatch, 0.0 if draw == "zero" else RAND_MAX[dtype])
    deq = VariationalDequantizer(17, Sequential(), base="logistic").to(dtype)
    x = torch.tensor([[0.0, 7.0, 16.0]], dtype=dtype)
    eps, log_base = deq.sample_base(x)
    assert torch.isfinite(eps).all() and torch.isfinite(log_base).all()
    assert float(eps.abs().max()) < 40  # the end cell's midpoint, not the dtype's limit
    y, logdet = deq(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_largest_noise_keeps_the_top_level_in_its_bin(monkeypatch, levels, dtype):
    """float32: 255 + (1 - 2**-24) = 256.0 (and 16 + (1 - 2**-24) = 17.0), so the
    dequantized top level was y = 1, the next bin's edge; it must stay below."""
    _rand_at(monkeypatch, RAND_MAX[dtype])
    x = torch.arange(levels, dtype=dtype).view(1, 1, 1, levels)
    deq = UniformDequantizer(levels)
    shifted = deq.in_bin(x, torch.full_like(x, RAND_MAX[dtype]))
    assert (shifted >= x).all() and (shifted < x + 1).all()
    y, logdet = deq(x)
    assert y.dtype == dtype and (y < 1).all()
    top = y[..., -1:]  # (other levels' y * L may round across the edge: y is x + u divided)
    assert torch.equal(deq.inverse(top), x[..., -1:])
    assert torch.isfinite(LogitTransform(1e-6)(y)[1]).all()


def test_variational_dequantization_keeps_the_top_level_in_its_bin(monkeypatch):
    """Its noise u = sigmoid(h) rounds to 1 - 2**-24 at most; x + u rounded up too."""
    _rand_at(monkeypatch, RAND_MAX[torch.float32])
    deq = VariationalDequantizer(256, Sequential(), base="logistic")
    x = torch.tensor([[0.0, 128.0, 255.0]])
    y, logdet = deq(x)
    assert (y < 1).all() and torch.equal(deq.inverse(y), x) and torch.isfinite(logdet).all()


def test_logit_alpha_zero_is_refused():
    """alpha = 0 sends y = 0 (level 0 with noise 0) to -inf."""
    with pytest.raises(ValueError, match=r"logit_alpha .* must be in \(0, 0.5\), got 0"):
        LogitTransform(0.0)
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match="must be in"):
            LogitTransform(bad)


def test_every_family_with_a_logit_alpha_refuses_zero():
    families = [
        name
        for name, entry in MODELS.items()
        if any(f.name == "logit_alpha" for f in dataclasses.fields(entry.config))
    ]
    assert {"residual-flow", "realnvp", "flowpp", "iresnet"} <= set(families)
    for name in families:  # refused by the config, and by the layer for a config built around it
        with pytest.raises(ValueError, match="logit_alpha"):
            dataclasses.replace(MODELS.get(name).config(), logit_alpha=0.0)
        cfg = MODELS.get(name).config()
        object.__setattr__(cfg, "logit_alpha", 0.0)
        with pytest.raises(ValueError, match="logit_alpha"):
            build_model(cfg)


def test_the_cli_refuses_logit_alpha_zero_in_one_line(tmp_path):
    from test_cli import resflow

    bad = resflow("train", "--set", "logit_alpha=0", "--steps", "1", "--out",
                  str(tmp_path / "run"), "--no-progress", check=False)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "logit_alpha" in bad.stderr
