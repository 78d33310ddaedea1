"""TarFlow on this machine: the digits preset at a wall-clock budget in both training
modes, sampling time with and without the key/value cache, and sample grids with and
without the one-step denoising.

    python benchmarks/tarflow.py --budget 120 --noise-budget 90 --out-dir benchmarks/out/tarflow

1. ``tarflow-digits`` (likelihood mode) trained for ``--budget`` seconds with its
   preset's settings, one thread: test bits/dim of the EMA model on the whole test set
   (comparable with ``benchmarks/families.py --task digits``).
2. The same preset in sample-quality mode (``noise_std`` on the [-1, 1] scale) for
   ``--noise-budget`` seconds: test bits/dim *of the noisy data*, and 64 samples from
   the same latents decoded with and without denoising.
3. Seconds to draw 64 samples, cached (one incremental pass per token per block)
   against uncached (a full pass per token), for the trained digits model (16 tokens)
   and the MNIST preset (49 tokens, untrained: the time does not depend on the weights).

Writes ``<out-dir>/tarflow_{likelihood,noisy,denoised}.png`` and
``benchmarks/out/tarflow.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import OUT, machine, save_json

from resflow.config import replace
from resflow.data import DataConfig, load_data
from resflow.evaluation import decode, save_image_grid
from resflow.flow import Flow
from resflow.layers.tarflow import without_cache
from resflow.models import PRESETS, build_model, count_parameters, get_preset
from resflow.training import Trainer


def train_for(model_cfg: Any, data: Any, budget: float, tag: str) -> Trainer:
    """Train ``model_cfg`` with the digits preset's settings for ``budget`` seconds."""
    torch.manual_seed(0)
    cfg = replace(PRESETS.get("tarflow-digits").train, steps=10**9, eval_every=10**9,
                  checkpoint_every=10**9, tensorboard=False, progress=False)  # fmt: skip
    trainer = Trainer(model_cfg, data, cfg, OUT / f"tarflow_run_{tag}", overwrite=True)
    t0, chunk = time.perf_counter(), 10
    while time.perf_counter() - t0 < budget:
        trainer.fit(until=trainer.step + chunk)
        per_step = (time.perf_counter() - t0) / trainer.step
        left = budget - (time.perf_counter() - t0)
        chunk = max(1, min(int(15 / per_step), int(left / per_step) + 1))
    trainer.train_s = time.perf_counter() - t0  # type: ignore[attr-defined]
    return trainer


def sampling_seconds(model: Flow, repeats: int = 3) -> dict[str, float]:
    """Median and minimum seconds for 64 samples, cached and uncached."""
    out: dict[str, float] = {}
    for name, cached in (("cached", True), ("uncached", False)):
        times = []
        for r in range(repeats):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            if cached:
                model.sample(64)
            else:
                with without_cache(model):
                    model.sample(64)
            times.append(time.perf_counter() - t0)
        out[f"{name}_median_s"], out[f"{name}_min_s"] = statistics.median(times), min(times)
    return out


def row(trainer: Trainer) -> dict[str, Any]:
    result = trainer.evaluate()
    return {
        "parameters": count_parameters(trainer.model),
        "steps": trainer.step,
        "sec_per_iter": trainer.train_s / max(trainer.step, 1),  # type: ignore[attr-defined]
        "test": result.mean,
        "test_stderr": result.stderr,
        "note": result.note,
        "printed": str(result),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=120.0, help="likelihood-mode training s")
    p.add_argument("--noise-budget", type=float, default=90.0, help="noise-mode training s")
    p.add_argument("--noise-std", type=float, default=0.1, help="on the [-1, 1] scale")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(OUT / "tarflow"), help="folder of the PNG grids")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    grids = Path(args.out_dir)
    grids.mkdir(parents=True, exist_ok=True)
    data = load_data(DataConfig(name="digits"))
    out: dict[str, Any] = {
        "machine": machine(),
        "budget_s": args.budget,
        "noise_budget_s": args.noise_budget,
        "noise_std": args.noise_std,
    }

    plain = train_for(get_preset("tarflow-digits"), data, args.budget, "likelihood")
    out["likelihood"] = row(plain)
    print(f"likelihood mode: {out['likelihood']}", flush=True)
    assert plain.ema is not None
    with plain.ema.swapped(plain.model):
        model = plain.model.eval()
        out["sampling_digits"] = sampling_seconds(model)
        torch.manual_seed(0)
        save_image_grid(model.sample(64), grids / "tarflow_likelihood.png", 17, scale=8)
    print(f"sampling 64, digits (16 tokens): {out['sampling_digits']}", flush=True)
    mnist = build_model(get_preset("tarflow-mnist")).eval()
    out["sampling_mnist"] = sampling_seconds(mnist, repeats=2)
    print(f"sampling 64, MNIST preset (49 tokens): {out['sampling_mnist']}", flush=True)

    noisy_cfg = get_preset("tarflow-digits", noise_std=args.noise_std)
    noisy = train_for(noisy_cfg, data, args.noise_budget, "noise")
    out["noise"] = row(noisy)
    print(f"noise mode: {out['noise']}", flush=True)
    assert noisy.ema is not None
    with noisy.ema.swapped(noisy.model):
        model = noisy.model.eval()
        torch.manual_seed(0)
        z = model.sample_latent(64)
        raw, clean = decode(model, z), decode(model, z, denoise=True)
    save_image_grid(raw, grids / "tarflow_noisy.png", 17, scale=8)
    save_image_grid(clean, grids / "tarflow_denoised.png", 17, scale=8)
    out["denoising_changed_pixels"] = float((raw != clean).float().mean())
    print(f"denoising changed {out['denoising_changed_pixels']:.1%} of the pixels", flush=True)
    print(f"wrote {save_json('tarflow', out)} and the grids in {grids}")


if __name__ == "__main__":
    main()
