"""Test bits/dim reached on MNIST by the ``mnist-small`` preset in a wall-clock budget.

    python benchmarks/mnist_budget.py --budget 600

Trains on the real MNIST files (``../shared/data/mnist`` or ``--data-dir``) for
``--budget`` seconds of training, then evaluates the EMA model on the whole test set
(10,000 images, 20 exact terms + unbiased tail) as mean +- standard error. Writes
``benchmarks/out/mnist_budget.json``, the learning curve and a sample grid.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import OUT, machine, save_json

from resflow.data import load_data
from resflow.evaluation import save_image_grid
from resflow.models import count_parameters, get_preset
from resflow.training import TrainConfig, Trainer

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=600.0)
    p.add_argument("--data-dir", default=str(DEFAULT_DIR))
    p.add_argument("--preset", default="mnist-small")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-max", type=int, default=None)
    args = p.parse_args()

    data = load_data("mnist", args.data_dir)
    model_cfg = get_preset(args.preset)
    cfg = TrainConfig(steps=10**9, batch_size=args.batch_size, lr=args.lr, warmup=100,
                      eval_every=10**9, checkpoint_every=10**9, ema_decay=0.999,
                      tensorboard=False, progress=False)  # fmt: skip
    trainer = Trainer(model_cfg, data, cfg, OUT / "mnist_budget_run")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.budget:
        trainer.fit(until=trainer.step + 20)
    train_s = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.history]
    t1 = time.perf_counter()
    test = data.test if args.test_max is None else data.test[: args.test_max]
    trainer.data.test = test
    res = trainer.evaluate(progress=False)
    eval_s = time.perf_counter() - t1
    imgs = trainer.sample(64)
    save_image_grid(imgs, OUT / "mnist_budget_samples.png", 256, scale=2)
    out = {
        "preset": args.preset, "parameters": count_parameters(trainer.model),
        "budget_s": args.budget, "train_s": train_s, "steps": trainer.step,
        "sec_per_iter": train_s / trainer.step, "test_bpd": res.mean,
        "test_stderr": res.stderr, "n_test": res.n, "eval_s": eval_s,
        "last_train_loss_mean100": sum(losses[-100:]) / len(losses[-100:]),
        "machine": machine(),
    }  # fmt: skip
    save_json("mnist_budget", out)
    print(
        f"{args.preset}: {trainer.step} steps in {train_s:.0f} s "
        f"({out['sec_per_iter']:.3f} s/iter); test {res} (eval {eval_s:.0f} s)"
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
