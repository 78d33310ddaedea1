"""RealNVP, Glow, the Residual Flow, TarFlow and DenseFlow side by side, each on the same
data and the same wall-clock training budget on this machine.

    python benchmarks/families.py --task digits --budget 120
    python benchmarks/families.py --task mnist --budget 180
    python benchmarks/families.py --task toy --budget 60

For each family's small preset: seconds per iteration, the test metric of the EMA
model after the budget (bits/dim on the 8x8 digits and MNIST; NLL in nats on
8gaussians / checkerboard / grid, beside the data's entropy), the time to draw 64
samples, and a sample grid (images) or a scatter (2-D). With ``--iw-samples K`` also
the variational bound and the importance-weighted bound with ``K`` noise draws per
test image (stochastic models: dequantization, DenseFlow's augmentation; ``--eval-max``
test images). Families train one after the other, one thread each (``--threads``).
Writes ``benchmarks/out/families_<task>.json`` and the grids
``benchmarks/out/families_<task>_<preset>.png``.
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

from resflow.config import replace
from resflow.data import DataConfig, load_data
from resflow.data.toy2d import toy_entropy
from resflow.evaluation import evaluate_bounds, save_image_grid
from resflow.models import MODELS, PRESETS, count_parameters, get_preset
from resflow.training import Trainer

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
PRESETS_BY_TASK = {
    "digits": (
        "realnvp-digits",
        "glow-digits",
        "digits-small",
        "tarflow-digits",
        "denseflow-digits",
    ),
    "mnist": ("realnvp-mnist", "glow-mnist", "mnist-small", "tarflow-mnist", "denseflow-mnist"),
    "toy": ("realnvp-toy2d", "glow-toy2d", "toy2d"),
}
TOY_DATA = ("8gaussians", "checkerboard", "grid")


def run_one(
    preset: str,
    data: Any,
    budget: float,
    tag: str,
    iw_samples: int = 0,
    eval_max: int | None = None,
) -> dict[str, Any]:
    """Train ``preset`` on ``data`` for ``budget`` seconds, then evaluate and sample."""
    torch.manual_seed(0)
    entry = PRESETS.get(preset)
    cfg = replace(entry.train, steps=10**9, eval_every=10**9, checkpoint_every=10**9,
                  tensorboard=False, progress=False)  # fmt: skip
    model_cfg = get_preset(preset)
    if data.levels is None:
        model_cfg = MODELS.get(entry.model).adapt(model_cfg, data.shape, None)
    trainer = Trainer(model_cfg, data, cfg, OUT / f"families_run_{tag}_{preset}", overwrite=True)
    t0 = time.perf_counter()
    chunk = 10  # steps per fit() call (each ends with a checkpoint): grown to ~15 s
    while time.perf_counter() - t0 < budget:
        trainer.fit(until=trainer.step + chunk)
        per_step = (time.perf_counter() - t0) / trainer.step
        left = budget - (time.perf_counter() - t0)
        chunk = max(1, min(int(15 / per_step), int(left / per_step) + 1))
    train_s = time.perf_counter() - t0
    result = trainer.evaluate()
    bounds = None
    if iw_samples:  # the single-draw bound above and the importance-weighted one
        test = data.test if eval_max is None else data.test[:eval_max]
        assert trainer.ema is not None
        torch.manual_seed(1)
        with trainer.ema.swapped(trainer.model):
            bounds = evaluate_bounds(trainer.model, test, k=iw_samples, batch_size=512)
    t1 = time.perf_counter()
    samples = trainer.sample(64)
    sample_s = time.perf_counter() - t1
    png = OUT / f"families_{tag}_{preset}.png"
    if data.levels is not None:
        save_image_grid(samples, png, data.levels, scale=max(1, 64 // data.shape[-1]))
    elif data.shape == (2,):
        from resflow.plots import plot_samples_2d

        more = trainer.sample(2000)
        plot_samples_2d(more, data.test[:2000], png)
    row = {
        "preset": preset,
        "model": entry.model,
        "parameters": count_parameters(trainer.model),
        "steps": trainer.step,
        "sec_per_iter": train_s / max(trainer.step, 1),
        "train_s": train_s,
        "test": result.mean,
        "test_stderr": result.stderr,
        "unit": result.unit,
        "sample64_s": sample_s,
        **(
            {}
            if bounds is None
            else {
                "iw_samples": iw_samples,
                "iw_n": bounds.iw.n,
                "elbo": bounds.elbo.mean,
                "elbo_stderr": bounds.elbo.stderr,
                "iw": bounds.iw.mean,
                "iw_stderr": bounds.iw.stderr,
            }
        ),
        "grid": png.name if png.exists() else None,
    }
    print(
        f"  {preset:16s} {row['parameters']:>9,} params  {trainer.step:5d} steps "
        f"({row['sec_per_iter']:.3f} s/iter)  test {result}  sample 64: {sample_s:.2f} s"
        + ("" if bounds is None else f"  IW bound (K={iw_samples}) {bounds.iw}"),
        flush=True,
    )
    return row


def _in_subprocess(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", "--task", args.task, "--presets", preset,
           "--budget", str(args.budget), "--threads", str(args.threads), "--data-dir",
           args.data_dir, "--iw-samples", str(args.iw_samples)]  # fmt: skip
    if args.eval_max is not None:
        cmd += ["--eval-max", str(args.eval_max)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise SystemExit(f"{preset} failed")
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    row = json.loads(lines[-1])
    print(f"  {preset}: peak memory {row['peak_rss_gb']:.2f} GB (process peak RSS)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=sorted(PRESETS_BY_TASK), default="digits")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=str(MNIST_DIR))
    p.add_argument("--presets", nargs="*", default=None, help="a subset of the task's presets")
    p.add_argument(
        "--iw-samples",
        type=int,
        default=0,
        help="also report the variational and the importance-weighted bound with K "
        "noise draws per test image (stochastic models: dequantization, augmentation)",
    )
    p.add_argument("--eval-max", type=int, default=None, help="test images for the IW bound")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    presets = args.presets or PRESETS_BY_TASK[args.task]
    out: dict[str, Any] = {"task": args.task, "budget_s": args.budget, "machine": machine()}
    if args.task == "toy":
        for name in TOY_DATA:
            data = load_data(DataConfig(name=name, n_train=50_000, n_test=10_000))
            print(f"{name} (entropy {toy_entropy(name):.4f} nats):", flush=True)
            rows = [
                run_one(q, data, args.budget, name, args.iw_samples, args.eval_max) for q in presets
            ]
            out[name] = {"entropy": toy_entropy(name), "rows": rows}
    elif args.one:  # (internal) one preset in this process; its row as the last line
        data = load_data(DataConfig(name=args.task, data_dir=args.data_dir))
        row = run_one(presets[0], data, args.budget, args.task, args.iw_samples, args.eval_max)
        print(json.dumps({**row, "peak_rss_gb": peak_rss_gb()}))
        return
    else:  # images: every preset in a fresh process, so that its peak memory is its own
        print(f"{args.task}: each preset in its own process", flush=True)
        out["rows"] = [_in_subprocess(q, args) for q in presets]
    path = save_json(f"families_{args.task}", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
