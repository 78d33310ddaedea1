"""Test NLL against wall-clock time for a 2-D Residual Flow (issue: core benchmark).

    python benchmarks/toy2d.py --data 8gaussians --budget 300
    python benchmarks/toy2d.py --data checkerboard --budget 300

Trains the ``toy2d`` preset (exact 2-D logdet) and evaluates the EMA model's test NLL
(exact logdet, 10,000 fresh points) at regular wall-clock intervals, against the
entropy of the data (the lowest NLL any model can reach). Evaluation time is not
counted in the training clock. Writes ``benchmarks/out/toy2d_<data>.{json,png}``.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import OUT, machine, save_json

from resflow.config import replace
from resflow.data import load_data
from resflow.data.toy2d import toy_entropy
from resflow.models import PRESETS, get_preset
from resflow.training import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="8gaussians")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds")
    p.add_argument("--eval-interval", type=float, default=20.0, help="seconds between evals")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--n-blocks", type=int, default=None)
    p.add_argument("--hidden", type=str, default=None, help="e.g. 128-128-128")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    torch.manual_seed(0)
    data = load_data(args.data, n_train=200_000, n_test=10_000)
    overrides: dict = {}
    if args.n_blocks:
        overrides["n_blocks"] = args.n_blocks
    if args.hidden:
        overrides["hidden"] = tuple(int(h) for h in args.hidden.split("-"))
    model_cfg = get_preset("toy2d", **overrides)
    train_cfg = replace(
        PRESETS.get("toy2d").train,
        batch_size=args.batch_size,
        steps=10**9,
        eval_every=10**9,
        checkpoint_every=10**9,
        tensorboard=False,
        progress=False,
    )
    if args.lr:
        train_cfg = replace(train_cfg, lr=args.lr)
    run = OUT / f"toy2d_{args.data}{args.tag}_run"
    trainer = Trainer(model_cfg, data, train_cfg, run)
    limit = toy_entropy(args.data)
    curve: list[dict[str, float]] = []
    clock, steps, next_eval = 0.0, 0, 0.0
    while clock < args.budget:
        t0 = time.perf_counter()
        trainer.fit(until=trainer.step + 25)
        clock += time.perf_counter() - t0
        steps = trainer.step
        if clock >= next_eval or clock >= args.budget:
            res = trainer.evaluate()
            curve.append({"seconds": clock, "step": steps, "nll": res.mean, "stderr": res.stderr})
            print(f"{clock:7.1f}s step {steps:6d} test NLL {res}  (limit {limit})", flush=True)
            next_eval += args.eval_interval
    sec_per_it = clock / steps
    out = {
        "data": args.data, "limit": limit, "machine": machine(), "budget_s": args.budget,
        "sec_per_iter": sec_per_it, "steps": steps, "final_nll": curve[-1]["nll"],
        "final_stderr": curve[-1]["stderr"], "model": str(model_cfg),
        "train": {"batch_size": args.batch_size, "lr": train_cfg.lr}, "curve": curve,
    }  # fmt: skip
    save_json(f"toy2d_{args.data}{args.tag}", out)
    _plot(curve, limit, args.data, OUT / f"toy2d_{args.data}{args.tag}.png")
    print(f"{sec_per_it:.4f} s/iter; final test NLL {curve[-1]['nll']:.4f} (limit {limit})")


def _plot(curve, limit, name, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["seconds"] / 60 for c in curve], [c["nll"] for c in curve], marker="o",
            label="resflow toy2d (test NLL)")  # fmt: skip
    if limit is not None:
        ax.axhline(limit, color="k", ls="--", label=f"data entropy {limit:.3f}")
        ax.axhline(limit + 0.05, color="gray", ls=":", label="limit + 0.05")
    if name == "8gaussians":
        ax.plot([5.9], [3.62], "rx", ms=10, label="authors' code, 1000 it (3.62)")
    ax.set_xlabel("training wall-clock (minutes, 2 CPU cores)")
    ax.set_ylabel("test NLL (nats)")
    ax.set_title(name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
