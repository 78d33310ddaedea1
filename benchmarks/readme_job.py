"""The README's first command: the digits-small recipe, old against new, by wall time
and test bits/dim.

    python benchmarks/readme_job.py                 # both recipes, seeds 0 and 1
    python benchmarks/readme_job.py --tiny          # a few steps (the test suite)

The old recipe is 1000 steps at lr 2e-3 (evaluated at 500 and 1000), the new one the
preset's (600 steps at lr 5e-3, evaluated once). Each run trains through ``Trainer``
as ``resflow train`` does and is timed from construction to the final evaluation;
runs of the two recipes alternate so that machine load hits both. Results:
``benchmarks/out/readme_job.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch
from common import machine, save_json

from resflow.data import load_data
from resflow.models import PRESETS, get_preset
from resflow.training import Trainer

OLD = {"lr": 2e-3, "steps": 1000, "eval_every": 500}


def run(recipe: str, seed: int, tiny: bool) -> dict[str, Any]:
    train = PRESETS.get("digits-small").train
    if recipe == "old":
        train = replace(train, **OLD)
    train = replace(train, seed=seed, progress=False, tensorboard=False)
    if tiny:
        train = replace(train, steps=3, eval_every=3, eval_max=32)
    data = load_data("digits")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = Trainer(get_preset("digits-small"), data, train, out).fit().final
        seconds = time.perf_counter() - t0
    assert result is not None
    return {"recipe": recipe, "seed": seed, "steps": train.steps, "lr": train.lr,
            "seconds": seconds, "bits_per_dim": result.mean, "stderr": result.stderr}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for recipe in ("old", "new") if seed % 2 == 0 else ("new", "old"):
            rows.append(run(recipe, seed, args.tiny))
            r = rows[-1]
            print(f"{r['recipe']:3s} seed {seed}: {r['steps']} steps at lr {r['lr']:g}: "
                  f"{r['seconds']:.0f} s, {r['bits_per_dim']:.4f} +- {r['stderr']:.4f} "
                  "bits/dim", flush=True)  # fmt: skip
    result = {"machine": machine(), "threads": torch.get_num_threads(), "runs": rows}
    save_json("readme_job_tiny" if args.tiny else "readme_job", result)
    return result


if __name__ == "__main__":
    main()
