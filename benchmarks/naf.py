"""NAF (DDSF), MAF and the vector Residual Flow side by side at the same wall-clock
training budget on this machine.

    python benchmarks/naf.py --task toy --budget 60
    python benchmarks/naf.py --task tabular --budget 120 [--data-dir DIR]

``toy``: 8gaussians, checkerboard and the 10x10 grid of Gaussians, test NLL beside each
data set's entropy. ``tabular``: POWER and GAS when their files are in ``--data-dir``
(test log-likelihood, beside the NAF paper's), otherwise a *synthetic stand-in* of the
same dimension (6 and 8): a mixture of 8 correlated Gaussians with a known density,
standardised, whose entropy is estimated by Monte Carlo -- clearly labelled as such.
Models train one after the other, one thread each. Writes ``benchmarks/out/naf_<task>.json``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from common import machine, save_json
from families import TOY_DATA, run_one

from resflow.data import DataConfig, DataSplit, load_data
from resflow.data.tabular_benchmarks import REFERENCE_LOG_LIKELIHOOD
from resflow.data.toy2d import toy_entropy

PRESETS = {
    "toy": ("naf-toy2d", "maf-toy2d", "toy2d"),
    "tabular": ("naf-{name}", "maf-{name}", "toy2d"),
}


def mixture_stand_in(dim: int, seed: int = 0, k: int = 8) -> tuple[DataSplit, float]:
    """Standardised samples of a random ``k``-component Gaussian mixture in ``dim``
    dimensions and its entropy in nats (Monte Carlo over 200,000 samples)."""
    gen = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(k, dim, generator=gen, dtype=torch.float64)
    a = torch.randn(k, dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    weights = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(weights),
        torch.distributions.MultivariateNormal(means, covs),
    )
    torch.manual_seed(seed)
    x = mix.sample((265_000,))
    train, valid, test, mc = x[:50_000], x[50_000:55_000], x[55_000:65_000], x[65_000:]
    mu, sd = train.mean(0), train.std(0)
    entropy = float(-mix.log_prob(mc).mean()) - float(sd.log().sum())

    def std(t: torch.Tensor) -> torch.Tensor:
        return ((t - mu) / sd).float()

    split = DataSplit(std(train), std(test), f"stand-in-{dim}d", valid=std(valid))
    return split, entropy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=sorted(PRESETS), default="toy")
    p.add_argument("--budget", type=float, default=60.0, help="training seconds per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="folder with the MAF archive's files")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"task": args.task, "budget_s": args.budget, "machine": machine()}
    if args.task == "toy":
        for name in TOY_DATA:
            data = load_data(DataConfig(name=name, n_train=50_000, n_test=10_000))
            print(f"{name} (entropy {toy_entropy(name):.4f} nats):", flush=True)
            rows = [run_one(q, data, args.budget, f"naf_{name}") for q in PRESETS["toy"]]
            out[name] = {"entropy": toy_entropy(name), "rows": rows}
    else:
        for name, dim in (("power", 6), ("gas", 8)):
            try:
                data = load_data(DataConfig(name=name, data_dir=args.data_dir))
                label, limit = name, None
            except (FileNotFoundError, ImportError) as err:
                print(f"{name}: {err}\n  -> using a synthetic stand-in of {dim} dimensions")
                data, limit = mixture_stand_in(dim)
                label = f"SYNTHETIC stand-in for {name.upper()} ({dim}-D Gaussian mixture)"
            print(f"{label}:" + (f" entropy {limit:.4f} nats" if limit else ""), flush=True)
            presets = [q.format(name=name) for q in PRESETS["tabular"]]
            rows = [run_one(q, data, args.budget, f"naf_{name}") for q in presets]
            out[name] = {"label": label, "entropy": limit, "rows": rows,
                         "paper_naf_log_likelihood": REFERENCE_LOG_LIKELIHOOD[name]}  # fmt: skip
    path = save_json(f"naf_{args.task}", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
