"""DenseFlow's small presets: seconds per iteration, peak memory, and the test bound
against the number of importance samples K, each variant trained for the same
wall-clock budget on this machine.

    python benchmarks/denseflow.py --task digits --budget 120
    python benchmarks/denseflow.py --task mnist --budget 180 --eval-max 500

Variants: ``denseflow`` (the task's preset, DenseFlow-8-4: 2 blocks of 2 units of 2
modules, k = 4, uniform dequantization), ``no-augmentation`` (the same 8 modules as 2
blocks of one unit: no cross-unit coupling), ``dense-dequantizer`` (the preset with a
small version of the authors' variational dequantizer). For each: parameters, steps,
seconds per iteration, the peak resident memory of its own process (data included),
and the EMA model's variational bound (one noise draw per image) and importance-
weighted bound for K in ``--ks``, all in bits/dim, mean +- standard error over the
test images. Each variant runs in a fresh process with one thread (``--threads``).
Writes ``benchmarks/out/denseflow_<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import OUT, machine, peak_rss_gb, save_json

from resflow.config import override, replace
from resflow.data import DataConfig, load_data
from resflow.evaluation import evaluate_bounds
from resflow.models import PRESETS, count_parameters, get_preset
from resflow.training import Trainer

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
SMALL_DEQ = {
    "dense_dequantization.enabled": True,
    "dense_dequantization.couplings": 2,
    "dense_dequantization.hidden": 16,
    "dense_dequantization.depth": 2,
    "dense_dequantization.growth": 8,
    "dense_dequantization.context": 8,
    "dense_dequantization.context_depth": 2,
    "dense_dequantization.context_growth": 4,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "denseflow": {},
    "no-augmentation": {"units": [1, 1], "modules": [4, 4]},
    "dense-dequantizer": SMALL_DEQ,
}


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant for the budget, then evaluate its bounds (in this process)."""
    torch.set_num_threads(args.threads)
    data = load_data(DataConfig(name=args.task, data_dir=args.data_dir))
    preset = f"denseflow-{args.task}"
    torch.manual_seed(0)
    cfg = replace(PRESETS.get(preset).train, steps=10**9, eval_every=10**9,
                  checkpoint_every=10**9, tensorboard=False, progress=False)  # fmt: skip
    model_cfg = override(get_preset(preset), VARIANTS[name])
    trainer = Trainer(model_cfg, data, cfg, OUT / f"denseflow_run_{args.task}_{name}",
                      overwrite=True)  # fmt: skip
    t0 = time.perf_counter()
    chunk = 10
    while time.perf_counter() - t0 < args.budget:
        trainer.fit(until=trainer.step + chunk)
        per_step = (time.perf_counter() - t0) / trainer.step
        left = args.budget - (time.perf_counter() - t0)
        chunk = max(1, min(int(15 / per_step), int(left / per_step) + 1))
    train_s = time.perf_counter() - t0
    test = data.test if args.eval_max is None else data.test[: args.eval_max]
    assert trainer.ema is not None
    bounds = {}
    t1 = time.perf_counter()
    with trainer.ema.swapped(trainer.model):
        for k in args.ks:
            torch.manual_seed(k)
            r = evaluate_bounds(trainer.model, test, k=k, batch_size=1024)
            bounds[k] = {"elbo": r.elbo.mean, "elbo_stderr": r.elbo.stderr,
                         "iw": r.iw.mean, "iw_stderr": r.iw.stderr}  # fmt: skip
    return {
        "variant": name,
        "preset": preset,
        "overrides": VARIANTS[name],
        "modules_L": model_cfg.n_modules,
        "parameters": count_parameters(trainer.model),
        "steps": trainer.step,
        "sec_per_iter": train_s / max(trainer.step, 1),
        "peak_rss_gb": peak_rss_gb(),
        "n_test": len(test),
        "eval_s": time.perf_counter() - t1,
        "bounds": bounds,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=("digits", "mnist"), default="digits")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per variant")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64], help="values of K")
    p.add_argument("--eval-max", type=int, default=None, help="test images to evaluate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=str(MNIST_DIR))
    p.add_argument("--variants", nargs="*", default=None, help=f"a subset of {list(VARIANTS)}")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one variant
    args = p.parse_args()
    if args.one is not None:
        print("ROW " + json.dumps(run_variant(args.one, args)), flush=True)
        return
    out: dict[str, Any] = {"task": args.task, "budget_s": args.budget, "machine": machine()}
    rows = []
    for name in args.variants or VARIANTS:
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROW "))[4:])
        rows.append(row)
        ks = ", ".join(
            f"K={k}: {b['iw']:.4f} +- {b['iw_stderr']:.4f}" for k, b in row["bounds"].items()
        )
        first = next(iter(row["bounds"].values()))
        print(
            f"  {name:18s} L={row['modules_L']} {row['parameters']:>8,} params "
            f"{row['steps']:5d} steps ({row['sec_per_iter']:.3f} s/iter, peak "
            f"{row['peak_rss_gb']:.2f} GB)  bound {first['elbo']:.4f} +- "
            f"{first['elbo_stderr']:.4f}  IW {ks} bits/dim",
            flush=True,
        )
        out["rows"] = rows
        save_json(f"denseflow_{args.task}", out)
    print(f"wrote {OUT / f'denseflow_{args.task}.json'}")


if __name__ == "__main__":
    main()
