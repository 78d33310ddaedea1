"""Every VI target that can be sampled: its samples follow its density.

Two checks that use only ``target.log_prob`` as the reference:

* Stein's identity: for ``x ~ p`` and the score ``s = grad log p~`` (autograd),
  ``E[s(x) x^T] = -I`` and ``E[s(x)] = 0`` -- a wrong scale, shift or shape in either
  the sampler or the density breaks it, whatever the normalizer;
* for the 2-D targets, the fraction of samples in each cell of a grid against the
  density's mass there (midpoint quadrature), a chi-square statistic.
"""

from __future__ import annotations

import math

import pytest
import torch

from resflow.vi.targets import TARGETS, make_target

SAMPLED = [("ring-mixture", 2), ("banana", 2), ("funnel", 2), ("funnel", 4)]


def test_every_sampled_target_is_checked_here():
    names = {name for name, _ in SAMPLED}
    for name in TARGETS.names():
        if make_target(name).sampler is not None:
            assert name in names, name


@pytest.mark.parametrize("name, dim", SAMPLED)
def test_samples_satisfy_steins_identity_for_the_density(name, dim):
    target = make_target(name, dim)
    n = 40_000
    x = target.sample(n, torch.Generator().manual_seed(11)).double().requires_grad_(True)
    (s,) = torch.autograd.grad(target(x).sum(), x)
    x = x.detach()
    outer = s[:, :, None] * x[:, None, :]  # [n, d, d]: E = -I
    mean, se = outer.mean(0), outer.std(0) / math.sqrt(n)
    eye = torch.eye(dim, dtype=torch.float64)
    diag = torch.diagonal(mean), torch.diagonal(se)
    assert ((diag[0] + 1).abs() < 6 * diag[1] + 0.03).all(), (name, mean)
    off = ~torch.eye(dim, dtype=torch.bool)
    assert ((mean - (-eye))[off].abs() < 6 * se[off] + 0.03).all(), (name, mean)
    s_mean, s_se = s.mean(0), s.std(0) / math.sqrt(n)
    assert (s_mean.abs() < 6 * s_se + 0.03).all(), (name, s_mean)


@pytest.mark.parametrize("name", ["ring-mixture", "banana"])
def test_two_dimensional_samples_fill_cells_as_the_density_says(name):
    target = make_target(name)
    lim, cells, grid = target.lim, 8, 800
    h = 2 * lim / grid
    g = torch.linspace(-lim + h / 2, lim - h / 2, grid, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass_pts = torch.exp(target(xy) - target.log_z) * h * h

    def cell_of(p: torch.Tensor) -> torch.Tensor:
        ij = torch.floor((p + lim) / (2 * lim) * cells).long()
        inside = ((ij >= 0) & (ij < cells)).all(1)
        return torch.where(inside, ij[:, 0] * cells + ij[:, 1], cells * cells)

    expected = torch.zeros(cells * cells + 1, dtype=torch.float64)
    expected.index_add_(0, cell_of(xy), mass_pts)
    expected[-1] = 1 - expected[:-1].sum()  # outside the square
    n = 50_000
    x = target.sample(n, torch.Generator().manual_seed(12)).double()
    observed = torch.bincount(cell_of(x), minlength=cells * cells + 1).double()
    e = expected.clamp(min=0) * n
    big = e >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([e[big], e[~big].sum().view(1)]).clamp(min=1.0)
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = int(big.sum())
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (name, chi2, dof)
