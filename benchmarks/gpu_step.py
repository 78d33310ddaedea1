"""Images per second and peak device memory of a training step on a GPU, per precision
and with or without compilation: the figures a GPU session records in docs/RESULTS.md.

    python benchmarks/gpu_step.py                          # paper MNIST preset, batch 64
    python benchmarks/gpu_step.py --preset mnist --n-blocks 1 1 1
    python benchmarks/gpu_step.py --preset toy2d-paper --data 8gaussians --batch 500 \
        --name gpu_step_toy2d_paper                        # the 2-D paper model
    python benchmarks/gpu_step.py --tiny --device cpu      # the test suite's seconds-long run

Variants: ``fp32``, ``tf32`` (TensorFloat-32 matrix products, CUDA only), ``bf16``
(autocast; residual blocks keep fp32) and ``fp32+compile`` (the fused LipSwish kernels,
``--compile``). Each runs in a fresh process, so that peak memory
(``torch.cuda.max_memory_allocated``; peak RSS on a CPU) and the compiled kernels
belong to that variant alone. A step is forward + backward + clipping + AdamW + the
Lipschitz refresh, as in training; the first ``--warmup`` steps (compilation, cuDNN
autotuning, the allocator's pool) are not timed, then ``--steps`` are, synchronized.
images/s is from the median step; the mean (printed too) includes the one step in ten
that certifies the norm bounds instead of refreshing them.
Results: ``benchmarks/out/<--name>.json`` (``gpu_step.json`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import machine, peak_rss_gb, save_json

VARIANTS = {
    "fp32": ("fp32", False),
    "tf32": ("tf32", False),
    "bf16": ("bf16", False),
    "fp32+compile": ("fp32", True),
}
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """One variant in this process."""
    from resflow.data import load_data
    from resflow.layers.base import after_optimizer_step
    from resflow.layers.residual.kernels import set_compile
    from resflow.models import build_model, count_parameters, get_preset
    from resflow.training import Batch, MaximumLikelihood, TrainConfig
    from resflow.training.optim import make_optimizer
    from resflow.training.optim import precision_context as _precision

    precision, compiled = VARIANTS[variant]
    device = torch.device(args.device)
    set_compile(compiled)
    autocast = _precision(precision, device)
    torch.manual_seed(0)
    overrides = {"n_blocks": tuple(args.n_blocks)} if args.n_blocks else {}
    model = build_model(get_preset(args.preset, **overrides)).to(device)
    if args.preset.startswith("mnist") and args.mnist.exists():
        data = load_data("mnist", args.mnist)
    else:
        data = load_data(args.data)
    x = data.train[: args.batch].to(device)
    opt = make_optimizer(model, TrainConfig())
    with torch.no_grad():
        model(x)  # data-dependent initialization, lazy buffers

    def step() -> None:
        with autocast():
            loss, _ = MaximumLikelihood(model)(model, Batch(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        after_optimizer_step(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)  # the mean below includes a certification step
    peak = (torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
            else peak_rss_gb())  # fmt: skip
    return {"variant": variant, "preset": args.preset, "batch": args.batch,
            "parameters": count_parameters(model), "sec_per_step": sec,
            "mean_sec_per_step": statistics.mean(times),
            "step_times": times, "images_per_s": args.batch / sec, "peak_gb": peak,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--n-blocks", type=int, nargs="*", help="override the blocks per scale")
    p.add_argument("--data", default="digits", help="data when not MNIST")
    p.add_argument("--mnist", type=Path, default=MNIST_DIR, help="MNIST's IDX files")
    p.add_argument("--name", default="gpu_step", help="benchmarks/out/<name>.json")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="digits-small, batch 8, 2 steps")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.data = "digits-small", "digits"
        args.batch, args.steps, args.warmup = 8, 2, 1
    if args.preset.startswith("mnist") and not args.mnist.exists():
        raise SystemExit(f"gpu_step.py: MNIST not found at {args.mnist} (give --mnist DIR)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py: no CUDA device here (use --device cpu to try it)")
    if args.worker:
        print(json.dumps(measure(args, args.worker)))
        return {}
    rows = []
    for variant in args.variants:
        if variant == "tf32" and not args.device.startswith("cuda"):
            continue  # TensorFloat-32 is an NVIDIA mode
        forwarded = list(argv if argv is not None else sys.argv[1:])
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--worker", variant],
                              capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"gpu_step.py: the {variant} run failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{variant:13s} {r['images_per_s']:8.1f} images/s  {r['sec_per_step']:.4f} s/step"
              f" (mean {r['mean_sec_per_step']:.4f})  peak {r['peak_gb']:.2f} GB  ({r['device']})",
              flush=True)  # fmt: skip
    result = {"machine": machine(), "rows": rows}
    if not args.tiny:
        print(f"wrote {save_json(args.name, result)}")
    return result


if __name__ == "__main__":
    main()
