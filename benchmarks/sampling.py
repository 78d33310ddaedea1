"""Sampling success rate and round-trip error of a trained run, in float32 and float64.

    python benchmarks/sampling.py RUN [--seeds 50] [--n 1000]

Prints, per dtype, how many of ``--seeds`` calls of ``model.sample(n)`` succeeded and the
worst ``|f(f^-1(z)) - z|`` (without the dequantizer) -> docs/RESULTS.md, section 7.
"""

from __future__ import annotations

import argparse

import torch

from resflow.layers.residual.block import InverseNotConvergedError
from resflow.runs import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    for dtype in (torch.float32, torch.float64):
        model = load_model(args.run).to(dtype)
        ok, worst = 0, 0.0
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            z = model.base.sample(args.n)
            try:
                with torch.no_grad():
                    model.inverse(z)
            except InverseNotConvergedError:
                continue
            ok += 1
            worst = max(worst, float(model.round_trip_error(z).max()))
        print(f"{dtype}: {ok}/{args.seeds} succeeded; worst round trip {worst:.2e}")


if __name__ == "__main__":
    main()
