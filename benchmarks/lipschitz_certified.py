"""Per-step cost of certified Lipschitz bounds against today's power iteration.

    python benchmarks/lipschitz_certified.py            # both models, interleaved A/B/C
    python benchmarks/lipschitz_certified.py --model toy2d-paper --steps 8

A training step is forward + backward + AdamW step + the Lipschitz update; the three
schemes run on three copies of one model, one step each in turn (interleaved), so
that machine load hits them alike:

* ``power``: today's scheme, the power iteration with its relative-change rule
  (``refresh_lipschitz(model, certified=False)``), which guarantees nothing;
* ``certified``: the certificate after every step (``after_optimizer_step``, the
  default ``certify_every=1``): ``||W|| <= c`` holds after every step;
* ``certified/10``: the certificate every 10 steps, the power iteration between.

Also prints, per Lipschitz layer, the looseness of the circular-convolution bound
against the exact norm of the zero-padded operator (what the exact path saves).
Results: ``benchmarks/out/lipschitz_certified.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import machine, save_json

from resflow.data import load_data
from resflow.layers.base import after_optimizer_step
from resflow.layers.residual.lipschitz_layers import LipschitzConv2d
from resflow.layers.residual.spectral import refresh_lipschitz, set_certify_every
from resflow.layers.residual.spectral_bounds import (
    circular_conv_norm,
    circular_grid,
    conv_spectral_norm,
)
from resflow.models import build_model, get_preset
from resflow.training import Batch, MaximumLikelihood, TrainConfig
from resflow.training.trainer import make_optimizer

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MODELS = {
    "mnist-1block": ("mnist", {"n_blocks": (1, 1, 1)}, 64),
    "toy2d-paper": ("toy2d-paper", {}, 500),
    "mnist-small": ("mnist-small", {}, 64),
}
SCHEMES = ("power", "certified", "certified/10")


def _data(preset: str, n: int) -> torch.Tensor:
    if preset.startswith("mnist"):
        return load_data("mnist", MNIST_DIR).train[:n]
    return load_data("8gaussians", n_train=4 * n, n_test=n).train[:n]


def looseness(model: torch.nn.Module) -> list[dict]:
    """Circular bound / exact norm - 1 for every 3x3 convolution of ``model``."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, LipschitzConv2d) and m.kernel_size[0] > 1 and m.v.numel():
            size, pad = m._size(), m._pad()
            exact = conv_spectral_norm(m.weight, size, pad).value
            circ = circular_conv_norm(m.weight, circular_grid(size, m.kernel_size, pad))
            rows.append({"layer": name, "kernel": list(m.weight.shape), "size": list(size),
                         "looseness": float(circ / exact) - 1})  # fmt: skip
    return rows


def bench(name: str, steps: int) -> dict:
    preset, overrides, batch = MODELS[name]
    torch.manual_seed(0)
    base = build_model(get_preset(preset, **overrides))
    x = _data(preset, batch)
    with torch.no_grad():
        base(x)  # data-dependent init, lazy buffers (not timed)
    models = {s: copy.deepcopy(base) for s in SCHEMES}
    set_certify_every(models["certified/10"], 10)
    opts = {s: make_optimizer(m, TrainConfig()) for s, m in models.items()}
    times: dict[str, list[float]] = {s: [] for s in SCHEMES}
    update: dict[str, list[float]] = {s: [] for s in SCHEMES}
    for step in range(steps + 1):
        for s in SCHEMES:
            model, opt = models[s], opts[s]
            model.train()
            t0 = time.perf_counter()
            loss, _ = MaximumLikelihood(model)(model, Batch(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            t1 = time.perf_counter()
            if s == "power":
                refresh_lipschitz(model, certified=False)
            else:
                after_optimizer_step(model)
            t2 = time.perf_counter()
            if step > 0:  # the first step warms up kernels
                times[s].append(t2 - t0)
                update[s].append(t2 - t1)
    out = {"model": name, "batch": batch, "steps": steps, "machine": machine(),
           "threads": torch.get_num_threads()}  # fmt: skip
    for s in SCHEMES:
        out[s] = {"sec_per_step": statistics.median(times[s]), "all": times[s],
                  "update_sec": statistics.median(update[s])}  # fmt: skip
    out["looseness"] = looseness(models["certified"])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), action="append")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.model or ["toy2d-paper", "mnist-1block"]:
        res = bench(name, args.steps)
        results.append(res)
        ref = res["power"]["sec_per_step"]
        for s in SCHEMES:
            r = res[s]
            ratio = r["sec_per_step"] / ref
            print(f"{name:13s} {s:13s} {r['sec_per_step']:7.3f} s/step (median of {args.steps}; "
                  f"update {r['update_sec']:.3f} s)  x{ratio:.3f}", flush=True)  # fmt: skip
        for row in res["looseness"]:
            print(f"    circular bound looser by {100 * row['looseness']:6.2f} % : "
                  f"{row['kernel']} on {row['size']}")  # fmt: skip
    save_json("lipschitz_certified", {"results": results})


if __name__ == "__main__":
    main()
