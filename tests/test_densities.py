"""Every vector family's log-density is one a user can trust, after a short training on
8gaussians (the data within radius ~4):

(a) ``exp(log p)`` integrates to 1 (within 2%) over ``[-8, 8]^2`` (float64 where the
    model converts);
(b) ``log p`` is finite everywhere on a grid ten times wider, in float32;
(c) the model's samples follow its own density (Pearson's chi-square over grid cells);
(d) ``f^-1(f(x)) = x`` on test data and on the wide grid.

The families are every registered model of kind ``vector``, each with the preset the
CLI picks for vector data, shrunk (``benchmarks/densities.py``'s ``SMALL``) to train in
seconds: a new family joins by registering. The measurements are those of
``benchmarks/densities.py``, which prints the same checks for longer runs.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

from resflow.data import load_data
from resflow.flow import Flow
from resflow.models import MODELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import densities  # noqa: E402

STEPS = 150
FINE = densities.Grid(8.0, 160)  # cells of 0.1: the modes' std is 0.35
WIDE = densities.Grid(100.0, 201)
RT_WIDE = densities.Grid(100.0, 21)


def _cases() -> list[object]:
    return [pytest.param(name, id=name) for name, _ in densities.vector_families()]


@functools.cache
def _data() -> object:
    return load_data("8gaussians", n_train=10_000, n_test=2000)


@functools.cache
def _trained(name: str) -> Flow:
    torch.manual_seed(0)
    preset = dict(densities.vector_families())[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is faster
    try:
        return densities.train(preset, _data(), STEPS, small=True)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _masses(name: str) -> torch.Tensor:
    return densities.cell_masses(_trained(name), FINE)


def test_every_vector_model_is_checked():
    names = {name for name, _ in densities.vector_families()}
    assert names == {n for n, e in MODELS.items() if e.kind == "vector"}
    assert {"maf", "naf", "realnvp-vector", "glow-vector", "residual-flow-vector"} <= names


@pytest.mark.parametrize("name", _cases())
def test_density_is_normalised_finite_self_consistent_and_invertible(name):
    """(a)-(d) in one test per family, so that each family is trained once per process."""
    model = _trained(name)
    # (a) the density integrates to 1
    total = float(_masses(name).sum())
    assert abs(total - 1) < 0.02, f"{name}: exp(log p) integrates to {total:.4f} on [-8, 8]^2"
    # (b) finite far from the data, in float32
    x = WIDE.points()
    lp = densities.log_prob(model, x)
    bad = ~torch.isfinite(lp)
    radius = float(x[bad].norm(dim=1).min()) if bool(bad.any()) else math.inf
    assert not bool(bad.any()), (
        f"{name}: log p not finite at {int(bad.sum())} of {len(x)} points of "
        f"[-100, 100]^2, the nearest at radius {radius:.1f}"
    )
    # (c) the samples follow the model's own density
    chi = densities.chi_square(model, _masses(name), FINE, n_samples=4000)
    assert chi.p_value > 1e-3, f"{name}: chi2 {chi.statistic:.1f} on {chi.dof} dof"
    # (d) the round trip, on the data and far from it
    on_data = densities.round_trip(model, _data().test[:500])  # type: ignore[attr-defined]
    wide = densities.round_trip(model, RT_WIDE.points())
    assert on_data < 1e-4, f"{name}: relative round-trip error {on_data:.2g} on the data"
    assert wide < 1e-3, f"{name}: relative round-trip error {wide:.2g} on [-100, 100]^2"


def test_chi_square_rejects_samples_of_another_density():
    """The test has power: samples of an untrained (standard normal) model against the
    density of a trained one."""
    preset = dict(densities.vector_families())["maf"]
    untrained = densities.train(preset, _data(), 0, small=True)  # type: ignore[arg-type]
    chi = densities.chi_square(untrained, _masses("maf"), FINE, n_samples=4000)
    assert chi.p_value < 1e-6


def test_benchmark_quick_mode():
    out = densities.main(["--quick", "--data", "8gaussians", "--families", "maf", "--papers"])
    rows = {r["model"]: r for r in out["rows"]}
    assert set(rows) == {"maf", "maf, paper's exp scale"} and out["steps"] == 20
    assert abs(rows["maf"]["integral"] - 1) < 0.02 and rows["maf"]["finite_wide"] == 1.0
