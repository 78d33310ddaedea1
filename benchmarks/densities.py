"""Can the log-densities of every vector family be trusted? Each family's toy preset,
trained briefly on a 2-D data set, measured against the laws any density obeys.

    python benchmarks/densities.py --steps 300 --data 8gaussians checkerboard
    python benchmarks/densities.py --quick          # tiny models, a few steps
    python benchmarks/densities.py --papers         # also MAF and NAF as their papers

``--papers`` adds MAF with its paper's ``exp`` scale and NAF with its paper's DDSF (no
soft clamp, no slope floor), to show what the bounds of :mod:`resflow.models.naf` fix.

Per family (every registered model of kind ``vector``, with the preset the CLI picks for
vector data):

* ``integral``: ``exp(log p)`` summed over a fine grid of ``[-L, L]^2`` (midpoint
  rule, float64 where the model converts); 1 up to the mass outside and the grid's error;
* ``finite``: the fraction of a grid ten times wider, ``[-10 L, 10 L]^2``, where ``log p``
  is finite in float32;
* ``rt data`` / ``rt wide``: the largest round-trip error ``|f^-1(f(x)) - x|`` relative
  to ``1 + |x|`` on test data and on the wide grid (float32; ``nan`` if any is not finite);
* ``chi2/dof`` and its p-value: samples drawn by the model, counted in the cells of a
  coarse grid, against the model's own probabilities of those cells (from ``log p``).

Writes ``benchmarks/out/densities.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from common import machine, save_json
from torch import Tensor

from resflow.config import replace
from resflow.data import DataSplit, load_data
from resflow.flow import Flow
from resflow.layers.base import after_optimizer_step
from resflow.models import MODELS, get_preset
from resflow.models.registry import Preset, default_preset
from resflow.training import Trainer

#: Smaller configs for ``--quick`` and the tests (a model not listed keeps its preset).
SMALL: dict[str, dict[str, Any]] = {
    "residual-flow-vector": {"n_blocks": 4, "hidden": (32, 32)},
    "iresnet-vector": {"n_blocks": 4, "hidden": (32, 32)},
    "naf": {"n_flows": 2, "hidden": (32, 32), "sigmoid_units": 8},
    "maf": {"n_flows": 3},
    "realnvp-vector": {"n_couplings": 4},
    "glow-vector": {"depth": 4},
    "nsf": {"n_flows": 3, "hidden": 32},
}


#: ``--papers``: the maps as their papers give them, before the bounds that keep them finite
#: far from the data (label, model, config changes).
PAPER_MAPS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("maf, paper's exp scale", "maf", {"scale_clamp": 0.0}),
    ("naf, paper's DDSF", "naf", {"param_bound": 0.0, "slope_floor": 0.0}),
)


def vector_families() -> Iterator[tuple[str, Preset]]:
    """Every registered vector model with the preset the CLI picks for vector data."""
    for name, entry in MODELS.items():
        if entry.kind == "vector":
            preset = default_preset(entry, "vector")
            if preset is None:
                raise LookupError(f"vector model {name!r} has no preset with default_for=vector")
            yield name, preset


def train(
    preset: Preset,
    data: DataSplit,
    steps: int,
    small: bool = False,
    seed: int = 0,
    changes: dict[str, Any] | None = None,
) -> Flow:
    """``preset`` (shrunk by :data:`SMALL` if ``small``, then ``changes``) trained
    ``steps`` steps by the :class:`Trainer`; the EMA weights, in eval mode."""
    overrides = SMALL.get(preset.model, {}) if small else {}
    config = get_preset(preset.name, **(overrides | (changes or {})))
    train_cfg = replace(preset.train, steps=10**9, eval_every=10**9, checkpoint_every=10**9,
                        tensorboard=False, progress=False, seed=seed)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, data, train_cfg, out)
        trainer.fit(until=steps)
    model = trainer.model
    assert trainer.ema is not None
    trainer.ema.copy_to(model)
    model.eval()
    after_optimizer_step(model)
    return model


@dataclass(frozen=True)
class Grid:
    """The cell centres of an ``n x n`` grid of equal cells covering ``[-lim, lim]^2``."""

    lim: float
    n: int

    @property
    def cell_area(self) -> float:
        return (2 * self.lim / self.n) ** 2

    def points(self, dtype: torch.dtype = torch.float32) -> Tensor:
        h = 2 * self.lim / self.n
        c = torch.linspace(-self.lim + h / 2, self.lim - h / 2, self.n, dtype=torch.float64)
        return torch.cartesian_prod(c, c).to(dtype)  # row-major: [i * n + j] = (c_i, c_j)


@torch.no_grad()
def log_prob(model: Flow, x: Tensor, batch: int = 20_000) -> Tensor:
    return torch.cat([model.log_prob(part) for part in x.split(batch)])


def as_float64(model: Flow) -> Flow:
    """A float64 copy of ``model`` (``model`` itself if it does not convert)."""
    try:
        out = copy.deepcopy(model).double()
        after_optimizer_step(out)
        log_prob(out, torch.zeros(2, model.dim, dtype=torch.float64))
        return out
    except (RuntimeError, TypeError):
        return model


def cell_masses(model: Flow, grid: Grid) -> Tensor:
    """``exp(log p) * area`` at every cell of ``grid`` (float64 where the model converts)."""
    m = as_float64(model)
    lp = log_prob(m, grid.points(m.dtype))
    return lp.double().exp() * grid.cell_area


def finite_fraction(model: Flow, grid: Grid) -> float:
    """Fraction of ``grid``'s points with a finite ``log p`` (the model's own dtype)."""
    return float(torch.isfinite(log_prob(model, grid.points())).double().mean())


@torch.no_grad()
def round_trip(model: Flow, x: Tensor, batch: int = 5000) -> float:
    """``max |f^-1(f(x)) - x| / (1 + |x|)`` over ``x`` (max norm); ``nan`` if any is not
    finite."""
    worst = 0.0
    for part in x.split(batch):
        back = model.inverse(model(part)[0])
        err = (back - part).abs().amax(1) / (1 + part.abs().amax(1))
        if not bool(torch.isfinite(err).all()):
            return math.nan
        worst = max(worst, float(err.max()))
    return worst


@dataclass(frozen=True)
class ChiSquare:
    statistic: float
    dof: int
    p_value: float


def chi_square(
    model: Flow, masses: Tensor, fine: Grid, n_samples: int, coarse: int = 10, seed: int = 0
) -> ChiSquare:
    """Pearson's test of ``n_samples`` samples of ``model`` against its own density.

    The cells: a ``coarse x coarse`` grid over the middle half of ``fine``'s square
    (each cell a block of fine cells, its probability their summed ``masses``) and one
    cell for everything else; cells expected to hold fewer than 5 samples are pooled.
    The probabilities are normalised over ``fine``'s square (its integration error
    does not count against the samples)."""
    n, k = fine.n, coarse
    if n % (2 * k):
        raise ValueError(f"the fine grid's {n} cells per side must split into 2 x {k}")
    lo, hi = n // 4, n - n // 4  # the middle half of the fine grid
    block = (hi - lo) // k
    mid = masses.view(n, n)[lo:hi, lo:hi].reshape(k, block, k, block).sum((1, 3)).flatten()
    total = masses.sum()
    probs = torch.cat([mid, (total - mid.sum()).view(1)]) / total
    torch.manual_seed(seed)
    x = model.sample(n_samples).double()
    half = fine.lim / 2
    inside = (x.abs() < half).all(1)
    idx = ((x + half) / (2 * half) * k).floor().long().clamp(0, k - 1)
    cell = torch.where(inside, idx[:, 0] * k + idx[:, 1], k * k)
    counts = torch.bincount(cell, minlength=k * k + 1).double()
    expected = probs * n_samples
    small = expected < 5
    if bool(small.any()):
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
        counts = torch.cat([counts[~small], counts[small].sum().view(1)])
    stat = float(((counts - expected) ** 2 / expected.clamp(min=1e-12)).sum())
    dof = len(expected) - 1
    p = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))
    return ChiSquare(stat, dof, p)


def measure(
    model: Flow,
    data: DataSplit,
    lim: float = 10.0,
    n: int = 400,
    wide_n: int = 201,
    rt_wide_n: int = 41,
    n_samples: int = 5000,
) -> dict[str, Any]:
    """All the checks of the module docstring on a trained 2-D ``model``."""
    fine = Grid(lim, n)
    masses = cell_masses(model, fine)
    chi = chi_square(model, masses, fine, n_samples)
    return {
        "integral": float(masses.sum()),
        "finite_wide": finite_fraction(model, Grid(10 * lim, wide_n)),
        "rt_data": round_trip(model, data.test[:2000]),
        "rt_wide": round_trip(model, Grid(10 * lim, rt_wide_n).points()),
        "chi2": chi.statistic,
        "chi2_dof": chi.dof,
        "chi2_p": chi.p_value,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data | family (preset) | steps | integral | finite (10x wider) | rt data | rt wide "
        "| chi2 / dof | p |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['model']} (`{r['preset']}`) | {r['steps']} | {r['integral']:.4f} "
            f"| {r['finite_wide']:.4f} | {r['rt_data']:.1e} | {r['rt_wide']:.1e} "
            f"| {r['chi2']:.1f} / {r['chi2_dof']} | {r['chi2_p']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard"])
    p.add_argument("--families", nargs="+", default=None, help="vector models (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small models, 20 steps, coarse grids")
    p.add_argument("--papers", action="store_true", help="also the papers' MAF and NAF maps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    grids = {"n": 200, "wide_n": 51, "rt_wide_n": 11, "n_samples": 1000} if args.quick else {}
    rows = []
    for data_name in args.data:
        data = load_data(data_name, n_train=20_000, n_test=5000)
        presets = dict(vector_families())
        runs = [(name, name, preset, {}) for name, preset in presets.items()]
        if args.papers:
            runs += [(label, m, presets[m], changes) for label, m, changes in PAPER_MAPS]
        for label, name, preset, changes in runs:
            if args.families and name not in args.families:
                continue
            t0 = time.perf_counter()
            model = train(preset, data, steps, small=args.quick, changes=changes)
            t1 = time.perf_counter()
            row = {"data": data_name, "model": label, "preset": preset.name, "steps": steps}
            row |= measure(model, data, **grids)
            row |= {"train_s": t1 - t0, "measure_s": time.perf_counter() - t1}
            rows.append(row)
            print(
                f"{data_name:12s} {label:22s} integral {row['integral']:.4f}  finite "
                f"{row['finite_wide']:.4f}  rt {row['rt_data']:.1e} / {row['rt_wide']:.1e}  "
                f"chi2 {row['chi2']:.1f}/{row['chi2_dof']} (p {row['chi2_p']:.3f})  "
                f"[{row['train_s']:.0f} + {row['measure_s']:.0f} s]",
                flush=True,
            )
    out = {"machine": machine(), "steps": steps, "quick": args.quick, "rows": rows}
    save_json("densities_quick" if args.quick else "densities", out)
    print(table(rows))
    return out


if __name__ == "__main__":
    main()
