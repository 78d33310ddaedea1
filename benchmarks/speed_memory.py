"""Seconds per training iteration and peak memory, each configuration in a fresh process.

    python benchmarks/speed_memory.py toy2d-paper      # authors' 2-D default, rebuilt
    python benchmarks/speed_memory.py mnist-1block     # authors' 1-block-per-scale MNIST
    python benchmarks/speed_memory.py mnist-paper      # the full paper MNIST preset
    python benchmarks/speed_memory.py fig3             # paper Fig. 3: memory of the tricks
    python benchmarks/speed_memory.py fig3-cifar10     # the same on the CIFAR-10 preset

A training iteration is forward + backward + AdamW step + Lipschitz refresh. Peak
memory is the process's peak resident set size (``ru_maxrss``), so every
configuration runs in its own subprocess. Results: ``benchmarks/out/<suite>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import OUT, machine, peak_rss_gb, save_json

from resflow.data import load_data
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.layers.residual.spectral import refresh_lipschitz
from resflow.models import build_model, count_parameters, get_preset
from resflow.training import Batch, MaximumLikelihood, TrainConfig
from resflow.training.trainer import make_optimizer

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _est(**kw) -> EstimatorConfig:
    return EstimatorConfig(**kw)


# name -> (preset, overrides, batch size, data, iterations)
CONFIGS: dict[str, tuple[str, dict, int, str, int]] = {
    # the authors' 2-D default: 100 blocks of a 4x128 MLP, coeff 0.9, batch 500, LipSwish,
    # unbiased geometric roulette; their toy script backpropagates through the series
    "toy2d-paper-naive": ("toy2d-paper", {"estimator": _est(dist="geometric",
                          neumann_grad=False, grad_in_forward=False)}, 500, "8gaussians", 5),
    "toy2d-paper-neumann-bif": ("toy2d-paper", {"estimator": _est(dist="geometric")}, 500,
                                "8gaussians", 5),
    "toy2d-paper-exact": ("toy2d-paper", {"estimator": _est(train_method="exact",
                          eval_method="exact")}, 500, "8gaussians", 5),
    # the authors' MNIST model with one block per scale (hidden 512, batch 64, Poisson,
    # Neumann gradient, backward-in-forward)
    "mnist-1block": ("mnist", {"n_blocks": (1, 1, 1)}, 64, "mnist", 5),
    "mnist-paper": ("mnist", {}, 64, "mnist", 1),
}  # fmt: skip
# paper Fig. 3: the four gradient variants, n = 10 terms, batch 64, one block per scale;
# CIFAR-10 on random images of its shape (memory does not depend on the pixel values);
# "tiny" is the test suite's seconds-long check of the same code
_FIG3 = {"": ("mnist", {"n_blocks": (1, 1, 1)}, 64, "mnist", 2),
         "cifar10-": ("cifar10", {"n_blocks": (1, 1, 1)}, 64, "cifar10-random", 2),
         "tiny-": ("digits-small", {"n_blocks": (1, 1), "hidden": 8, "fc_blocks": 1,
                                    "fc_hidden": (8,)}, 8, "digits", 1)}  # fmt: skip
_FIG3_SUITES: dict[str, list[str]] = {}
for _prefix, (_preset, _over, _bs, _data, _it) in _FIG3.items():
    _suite = f"fig3{'-' + _prefix.rstrip('-') if _prefix else ''}"
    _FIG3_SUITES[_suite] = []
    for _neu in (False, True):
        for _bif in (False, True):
            _name = f"fig3-{_prefix}{'neumann' if _neu else 'naive'}{'-bif' if _bif else ''}"
            CONFIGS[_name] = (_preset, {**_over, "estimator": _est(
                dist="none", n_exact_terms=10, neumann_grad=_neu, grad_in_forward=_bif)}, _bs,
                _data, _it)  # fmt: skip
            _FIG3_SUITES[_suite].append(_name)

SUITES = {
    "toy2d-paper": ["toy2d-paper-naive", "toy2d-paper-neumann-bif", "toy2d-paper-exact"],
    "mnist-1block": ["mnist-1block"],
    "mnist-paper": ["mnist-paper"],
}
SUITES.update(_FIG3_SUITES)


def _batch(data_name: str, n: int, split: str = "train") -> torch.Tensor:
    if data_name == "mnist":
        data = load_data("mnist", MNIST_DIR)
    elif data_name == "cifar10-random":
        return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    elif data_name == "digits":
        data = load_data("digits")
    else:
        data = load_data(data_name, n_train=4 * n, n_test=n)
    x = data.train if split == "train" else data.test
    return x[:n]


def run_one(name: str) -> dict:
    """Measure one configuration in this process."""
    preset, overrides, batch, data_name, iters = CONFIGS[name]
    torch.manual_seed(0)
    cfg = get_preset(preset, **overrides)
    cuda = torch.cuda.is_available()
    model = build_model(cfg).to("cuda" if cuda else "cpu")
    x = _batch(data_name, batch).to("cuda" if cuda else "cpu")
    opt = make_optimizer(model, TrainConfig())
    with torch.no_grad():
        model(x)  # data-dependent init, lazy buffers (not timed)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        loss, _ = MaximumLikelihood(model)(model, Batch(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        refresh_lipschitz(model)
        times.append(time.perf_counter() - t0)
    out = {
        "config": name, "parameters": count_parameters(model), "batch": batch,
        "sec_per_iter": statistics.median(times[1:]), "min_sec_per_iter": min(times[1:]),
        "iter_times": times[1:], "first_iter_s": times[0],
        "peak_rss_gb": peak_rss_gb(), "machine": machine(),
    }  # fmt: skip
    if cuda:  # the paper's measure: GPU memory allocated by torch
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["device"] = torch.cuda.get_device_name()
    if name == "mnist-1block":  # evaluation of 64 test images, 20 exact terms + tail
        model.eval()
        xt = _batch("mnist", 64, "test")
        refresh_lipschitz(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.bits_per_dim(xt)
        out["eval_64_s"] = time.perf_counter() - t0
        out["peak_rss_gb"] = peak_rss_gb()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("suite", choices=sorted(SUITES) + sorted(CONFIGS))
    p.add_argument("--one", action="store_true", help="(internal) run one config here")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.suite)))
        return
    names = SUITES.get(args.suite, [args.suite])
    results = []
    for name in names:
        proc = subprocess.run([sys.executable, __file__, name, "--one"], capture_output=True,
                              text=True, cwd=Path(__file__).parent)  # fmt: skip
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        extra = f", eval 64 images {res['eval_64_s']:.2f} s" if "eval_64_s" in res else ""
        print(f"{name:26s} {res['parameters']:>11,} params  batch {res['batch']:4d}  "
              f"{res['sec_per_iter']:7.3f} s/iter (median; min {res['min_sec_per_iter']:.3f})  "
              f"peak {res['peak_rss_gb']:.2f} GB{extra}", flush=True)  # fmt: skip
    if args.suite.startswith("fig3"):
        key = "cuda_max_allocated_gb" if "cuda_max_allocated_gb" in results[0] else "peak_rss_gb"
        for r in results:  # the paper reports each variant against naive backprop
            r["ratio_to_naive"] = r[key] / results[0][key]
            print(f"{r['config']:26s} {r[key]:.2f} GB = {r['ratio_to_naive']:.2f} x naive")
    save_json(args.suite, {"machine": results[0]["machine"], "results": results})
    if args.suite.startswith("fig3"):
        _plot_fig3(results, OUT / f"{args.suite}.png", args.suite)


def _plot_fig3(results: list[dict], path: Path, suite: str = "fig3") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = "cuda_max_allocated_gb" in results[0]
    key = "cuda_max_allocated_gb" if gpu else "peak_rss_gb"
    prefix = suite + "-" if suite != "fig3" else "fig3-"
    labels = [r["config"].removeprefix(prefix) for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, [r[key] for r in results])
    for bar, r in zip(bars, results):
        ratio = r[key] / results[0][key]
        ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("GPU memory allocated (GB)" if gpu else "peak memory (GB)")
    what = {"fig3": "MNIST", "fig3-cifar10": "CIFAR-10"}.get(suite, suite)
    measure = "torch.cuda.max_memory_allocated" if gpu else "process peak RSS"
    ax.set_title(f"{what}, 1 block/scale, batch {results[0]['batch']}, 10 terms ({measure})",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
