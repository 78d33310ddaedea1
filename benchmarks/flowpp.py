"""Flow++'s ablation at small scale, and variational dequantization on the Residual
Flow, each variant trained for the same wall-clock budget on this machine.

    python benchmarks/flowpp.py --task digits --budget 120
    python benchmarks/flowpp.py --task mnist --budget 180 --eval-max 1000

Variants (the seed's Table 3, Ho et al. 2019, at the small presets' sizes):
``flowpp`` (variational dequantization, logistic-mixture couplings, self-attention),
``uniform`` (uniform dequantization), ``affine`` (affine couplings, in the dequantizer
too), ``noattn`` (a pointwise gate instead of attention), then the Residual Flow's
small preset with uniform and with variational dequantization. For each: steps,
seconds per iteration, the EMA model's test bits/dim (one noise draw per image: the
variational bound) and the importance-weighted bound with K draws, both mean +-
standard error. One thread (``--threads``). Writes ``benchmarks/out/flowpp_<task>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import OUT, machine, save_json

from resflow.config import override, replace
from resflow.data import DataConfig, load_data
from resflow.evaluation import evaluate_bounds
from resflow.models import PRESETS, count_parameters, get_preset
from resflow.training import Trainer

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
PRESETS_BY_TASK = {
    "digits": ("flowpp-digits", "digits-small"),
    "mnist": ("flowpp-mnist", "mnist-small"),
}
SMALL_DEQ = {"dequantization.kind": "variational", "dequantization.couplings": 2,
             "dequantization.hidden": 16, "dequantization.blocks": 1,
             "dequantization.components": 4, "dequantization.context_hidden": 16,
             "dequantization.context_blocks": 1}  # fmt: skip
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    # name: (index of the task's preset, overrides)
    "flowpp": (0, {}),
    "uniform": (0, {"dequantization.kind": "uniform"}),
    "affine": (0, {"coupling": "affine", "dequantization.coupling": "affine"}),
    "noattn": (0, {"attention": False, "dequantization.attention": False}),
    "resflow-uniform": (1, {}),
    "resflow-variational": (1, SMALL_DEQ),
}


def run_one(name: str, preset: str, sets: dict[str, Any], data: Any, args: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    entry = PRESETS.get(preset)
    cfg = replace(entry.train, steps=10**9, eval_every=10**9, checkpoint_every=10**9,
                  tensorboard=False, progress=False)  # fmt: skip
    model_cfg = override(get_preset(preset), sets)
    trainer = Trainer(model_cfg, data, cfg, OUT / f"flowpp_run_{args.task}_{name}", overwrite=True)
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
    torch.manual_seed(1)
    with trainer.ema.swapped(trainer.model):
        bounds = evaluate_bounds(trainer.model, test, k=args.k, batch_size=512)
    row = {
        "variant": name,
        "preset": preset,
        "overrides": sets,
        "parameters": count_parameters(trainer.model),
        "steps": trainer.step,
        "sec_per_iter": train_s / max(trainer.step, 1),
        "elbo_bpd": bounds.elbo.mean,
        "elbo_stderr": bounds.elbo.stderr,
        "iw_bpd": bounds.iw.mean,
        "iw_stderr": bounds.iw.stderr,
        "k": args.k,
        "n_test": bounds.elbo.n,
    }
    print(
        f"  {name:20s} {row['parameters']:>8,} params {trainer.step:5d} steps "
        f"({row['sec_per_iter']:.3f} s/iter)  bound {bounds.elbo.mean:.4f} +- "
        f"{bounds.elbo.stderr:.4f}  IW(K={args.k}) {bounds.iw.mean:.4f} +- "
        f"{bounds.iw.stderr:.4f} bits/dim",
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=sorted(PRESETS_BY_TASK), default="digits")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per variant")
    p.add_argument("--k", type=int, default=16, help="noise draws of the IW bound")
    p.add_argument("--eval-max", type=int, default=None, help="test images to evaluate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=str(MNIST_DIR))
    p.add_argument("--variants", nargs="*", default=None, help=f"a subset of {list(VARIANTS)}")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(DataConfig(name=args.task, data_dir=args.data_dir))
    print(f"{args.task} {tuple(data.shape)}, {len(data.test)} test images:", flush=True)
    out: dict[str, Any] = {"task": args.task, "budget_s": args.budget, "machine": machine()}
    rows = []
    for name in args.variants or VARIANTS:
        index, sets = VARIANTS[name]
        rows.append(run_one(name, PRESETS_BY_TASK[args.task][index], sets, data, args))
        out["rows"] = rows
        save_json(f"flowpp_{args.task}", out)
    print(f"wrote {OUT / f'flowpp_{args.task}.json'}")


if __name__ == "__main__":
    main()
