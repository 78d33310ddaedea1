"""A/B step timings: the working tree against a git ref, interleaved in one run.

    python benchmarks/ab.py --ref main~1                      # every configuration
    python benchmarks/ab.py --ref v0.2 --configs mnist-1block --pairs 7

The ref's ``src/`` is exported with ``git archive`` into ``benchmarks/out/ab-<sha>``
(nothing in the repository changes), and each measurement runs in a fresh process whose
``PYTHONPATH`` points at one version or the other, so both see the same machine,
data and load. The pairs run in the order A B, B A, A B, ... (drift cancels), and for
every pair the ratio ``B / A`` of the median seconds per step is printed, then the
median ratio over the pairs. ``A`` is the ref, ``B`` the working tree: a ratio of 0.5
means twice as fast.

Each process also counts the host reads of tensor values in one refreshing step (as an
accelerator runs it; on a GPU each one waits for the device) and the ``aten`` operators
of one step (``torch.profiler``); ``AB_COUNT_OPS=0`` skips both. It also measures the
machine's float32 matrix-product rate (GFLOP/s of a
square ``torch.mm``, median of a few) and the floating-point operations of one step
(``torch.utils.flop_counter``), and reports the fraction of that peak the step
reaches. A step is forward + backward + gradient clipping + AdamW + Lipschitz
refresh, as in training, where every ``certify_every``-th step (10 by default) certifies
the norms instead of refreshing them: that difference, timed once, is added amortized
(``certify_amortized`` in the JSON). ``eval64`` is the log-density of 64 MNIST test images with
the evaluation estimator (20 exact terms plus the unbiased tail).

``RESFLOW_COMPILE=1`` turns on ``--compile`` in both processes (a version from before
it ignores the variable). On a GPU: ``AB_DEVICE=cuda`` (steps synchronized, the
device's peak memory instead of the RSS); ``--a-src DIR`` takes A from an exported
``src/`` where there is no git, and ``AB_MNIST=DIR`` points at MNIST's files where
``../shared`` is not beside the checkout.

Results: ``benchmarks/out/ab.json`` and ``benchmarks/out/ab.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
MNIST_DIR = Path(os.environ.get("AB_MNIST", ROOT.parent / "shared" / "data" / "mnist"))
#: ``AB_DEVICE=cuda`` times the steps on a GPU (synchronized; peak device memory)
DEVICE = os.environ.get("AB_DEVICE", "cpu")

# name -> (preset, overrides, batch, data, timed steps); ``eval64`` times evaluation
CONFIGS: dict[str, tuple[str, dict[str, Any], int, str, int]] = {
    "toy2d-paper": ("toy2d-paper", {}, 500, "8gaussians", 5),
    # the authors' toy script: 2 exact terms + a geometric roulette, backpropagated
    # through the series (the estimator's fields are made into an EstimatorConfig)
    "toy2d-paper-series": (
        "toy2d-paper",
        {
            "estimator": {
                "train_method": "series",
                "dist": "geometric",
                "neumann_grad": False,
                "grad_in_forward": False,
            }
        },
        500,
        "8gaussians",
        5,
    ),
    # resflow's default series training: Poisson roulette, Neumann gradient in the forward
    "toy2d-paper-neumann": (
        "toy2d-paper",
        {"estimator": {"train_method": "series"}},
        500,
        "8gaussians",
        5,
    ),
    "mnist-1block": ("mnist", {"n_blocks": (1, 1, 1)}, 64, "mnist", 4),
    "mnist-paper": ("mnist", {}, 64, "mnist", 1),
    "mnist-small": ("mnist-small", {}, 64, "mnist", 4),
    "digits-small": ("digits-small", {}, 64, "digits", 10),
    "toy2d": ("toy2d", {}, 500, "8gaussians", 10),
    "eval64": ("mnist", {"n_blocks": (1, 1, 1)}, 64, "mnist", 3),
}
DEFAULT = ("mnist-1block", "toy2d-paper", "toy2d", "eval64")


# ---- one measurement (runs inside the version under test) ------------------------------
def _sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    import torch

    n = 8192 if DEVICE.startswith("cuda") else n
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    torch.mm(a, b)
    _sync()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


READS = ("item", "__float__", "__int__", "__bool__", "tolist")


def _reads_and_ops(step: Any) -> tuple[int, int]:
    """Host reads of tensor values in one (refreshing) step, as an accelerator runs it
    (the reads made only where they are free, on the CPU, are off; the roulette's term
    counts, drawn by the host's generator, are not counted; in a version that defers
    its value checks they are deferred as its trainer does), and the ``aten`` operators
    of one step (``torch.profiler``)."""
    import sys

    import torch
    from torch.profiler import ProfilerActivity, profile

    from resflow.layers.residual import in_forward

    in_forward.reads_are_free = lambda t: False
    try:  # versions with deferred checks: as their trainer runs a step
        from resflow.value_checks import DeferredChecks, deferred

        scope: Any = lambda: deferred(DeferredChecks())  # noqa: E731
    except ImportError:
        import contextlib

        scope = contextlib.nullcontext
    count = [0]
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(original: Any) -> Any:
        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            if sys._getframe(1).f_code.co_name != "draw_terms":
                count[0] += 1
            return original(self, *args, **kwargs)

        return read

    step()  # the accelerator's paths warmed
    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        with scope():
            step()
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
    with profile(activities=[ProfilerActivity.CPU]) as prof, scope():
        step()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return count[0], ops


def _data(name: str, n: int, split: str) -> Any:
    from resflow.data import load_data

    if name == "mnist":
        data = load_data("mnist", MNIST_DIR)
    else:
        data = load_data(name, n_train=4 * n, n_test=n)
    return (data.train if split == "train" else data.test)[:n]


def measure(name: str) -> dict[str, Any]:
    """Seconds per step (median of the timed steps after one untimed), FLOPs of one step,
    peak RSS, matmul rate -- in this process, with whatever ``resflow`` it imports."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import resflow
    from resflow.layers.residual.spectral import refresh_lipschitz
    from resflow.models import build_model, get_preset
    from resflow.training import Batch, MaximumLikelihood, TrainConfig
    from resflow.training.trainer import make_optimizer

    torch.set_num_threads(int(os.environ.get("AB_THREADS", "1")))
    try:  # as the trainer and the command line do, in versions that have it
        from resflow.allocator import keep_freed_memory
    except ImportError:  # a version from before it
        keep_freed_memory = None
    if keep_freed_memory is not None:
        keep_freed_memory()
    preset, overrides, batch, data_name, steps = CONFIGS[name]
    counts_only = os.environ.get("AB_COUNTS_ONLY") == "1"
    if counts_only:  # reads and operators do not depend on the batch size
        batch, steps = min(batch, 8), 0
    if isinstance(overrides.get("estimator"), dict):
        from resflow.layers.residual.logdet import EstimatorConfig

        overrides = {**overrides, "estimator": EstimatorConfig(**overrides["estimator"])}
    torch.manual_seed(0)
    model = build_model(get_preset(preset, **overrides)).to(DEVICE)
    evaluating = name == "eval64"
    x = _data(data_name, batch, "test" if evaluating else "train").to(DEVICE)
    opt = make_optimizer(model, TrainConfig())
    with torch.no_grad():
        model(x)  # data-dependent initialization, lazy buffers

    def step(certified: bool = False) -> None:
        if evaluating:
            with torch.no_grad():
                model.log_prob(x)
            return
        loss, _ = MaximumLikelihood(model)(model, Batch(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        refresh_lipschitz(model, certified=certified)

    if evaluating:
        model.eval()
        refresh_lipschitz(model)
    step()  # untimed: allocator and caches warm
    _sync()
    if DEVICE.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [math.nan]
    for i in range(steps):
        t0 = time.perf_counter()
        step()
        _sync()
        times[i:] = [time.perf_counter() - t0]
    # the memory of the timed steps (the counts below hold more: the profiler's records)
    peak = (
        torch.cuda.max_memory_allocated() / 1e9
        if DEVICE.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    )
    # the trainer certifies the norms every `certify_every` steps instead of refreshing
    # them: add that difference, amortized
    every = next((int(m.certify_every) for m in model.modules() if hasattr(m, "certify_every")), 0)
    extra = 0.0
    if every and not evaluating and not counts_only:
        t0 = time.perf_counter()
        refresh_lipschitz(model, certified=False)
        t1 = time.perf_counter()
        refresh_lipschitz(model)
        extra = max(0.0, (time.perf_counter() - t1) - (t1 - t0)) / every
    flops = math.nan
    if os.environ.get("AB_COUNT_FLOPS", "1") == "1" and not counts_only:
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                step()
            flops = float(counter.get_total_flops())
        except RuntimeError:  # older versions' autograd.grad paths defeat the counter
            flops = math.nan
    reads, ops = _reads_and_ops(step) if os.environ.get("AB_COUNT_OPS", "1") == "1" else (-1, -1)
    cert_reads, cert_ops = (-1, -1)
    if counts_only and every and not evaluating:  # a step that certifies every layer
        cert_reads, cert_ops = _reads_and_ops(lambda: step(certified=True))
    sec = statistics.median(times) + extra
    gflops_peak = _matmul_gflops()
    return {
        "config": name,
        "resflow": str(Path(resflow.__file__).resolve().parent),
        "sec_per_step": sec,
        "step_times": times,
        "certify_amortized": extra,
        "gflop_per_step": flops / 1e9,
        "gflops": flops / sec / 1e9,
        "matmul_gflops": gflops_peak,
        "fraction_of_peak": flops / sec / 1e9 / gflops_peak,
        # on a GPU: the device's peak allocated memory over the timed steps
        "peak_rss_gb": peak,
        "certify_host_reads": cert_reads,
        "certify_aten_ops": cert_ops,
        "host_reads_per_step": reads,
        "aten_ops_per_step": ops,
        "device": DEVICE,
    }


# ---- the driver --------------------------------------------------------------------------
def export_ref(ref: str) -> Path:
    """``src/`` of ``ref`` under ``benchmarks/out/ab-<sha>/src`` (via ``git archive``)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    dest = OUT / f"ab-{sha}"
    if not (dest / "src" / "resflow" / "__init__.py").exists():
        blob = subprocess.run(["git", "archive", "--format=tar", sha, "src"], cwd=ROOT,
                              check=True, capture_output=True).stdout  # fmt: skip
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=BytesIO(blob)) as tar:
            tar.extractall(dest, filter="data")
    return dest / "src"


def run_version(src: Path, name: str, count_flops: bool = True) -> dict[str, Any]:
    env = {
        "AB_COUNT_FLOPS": "1" if count_flops else "0",
        **os.environ,
        "PYTHONPATH": str(src),
        "OMP_NUM_THREADS": os.environ.get("AB_THREADS", "1"),
    }
    proc = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True,
                          text=True, env=env, cwd=HERE)  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{name} failed with {src}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(res["resflow"]) != src.resolve() / "resflow":
        raise SystemExit(f"imported {res['resflow']}, expected {src}/resflow")
    return res


def compare(name: str, a_src: Path, b_src: Path, pairs: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    ratios = []
    for i in range(pairs):
        order = ("A", "B") if i % 2 == 0 else ("B", "A")
        # FLOPs (one more step) are counted for the working tree only: the fraction of
        # peak is B's; A's algorithm may do other work
        got = {v: run_version(a_src if v == "A" else b_src, name, v == "B") for v in order}
        for v in order:
            runs[v].append(got[v])
        ratio = got["B"]["sec_per_step"] / got["A"]["sec_per_step"]
        ratios.append(ratio)
        print(f"  {name:13s} pair {i + 1}: A {got['A']['sec_per_step']:.4f} s  "
              f"B {got['B']['sec_per_step']:.4f} s  B/A {ratio:.3f}", flush=True)  # fmt: skip

    def med(v: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[v])

    summary = {
        "config": name,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        **{f"{v}_{k}": med(v, k) for v in "AB" for k in
           ("sec_per_step", "peak_rss_gb", "fraction_of_peak", "matmul_gflops",
            "host_reads_per_step", "aten_ops_per_step", "certify_host_reads",
            "certify_aten_ops")},
        "gflop_per_step": runs["B"][0]["gflop_per_step"],
        "A_gflop_per_step": runs["A"][0]["gflop_per_step"],
    }  # fmt: skip
    print(f"{name:13s} median B/A {summary['median_ratio']:.3f}  "
          f"A {summary['A_sec_per_step']:.4f} s ({summary['A_fraction_of_peak']:.1%} of peak, "
          f"{summary['A_peak_rss_gb']:.2f} GB)  B {summary['B_sec_per_step']:.4f} s "
          f"({summary['B_fraction_of_peak']:.1%}, {summary['B_peak_rss_gb']:.2f} GB)  "
          f"{summary['gflop_per_step']:.1f} GFLOP/step; host reads per step "
          f"{summary['A_host_reads_per_step']:.0f} -> {summary['B_host_reads_per_step']:.0f}, "
          f"aten ops {summary['A_aten_ops_per_step']:,.0f} -> "
          f"{summary['B_aten_ops_per_step']:,.0f}; a certifying step: reads "
          f"{summary['A_certify_host_reads']:.0f} -> {summary['B_certify_host_reads']:.0f}, "
          f"ops {summary['A_certify_aten_ops']:,.0f} -> {summary['B_certify_aten_ops']:,.0f}",
          flush=True)  # fmt: skip
    return summary


def _plot(rows: list[dict[str, Any]], path: Path, ref: str, b: str = "working tree") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["ratios"]), r["ratios"], color="0.6", s=12)
        ax.scatter([i], [r["median_ratio"]], color="C0", s=40, zorder=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.5, color="C2", lw=0.8, ls="--", label="2x faster")
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows])
    ax.set_ylabel(f"time per step: {b} / {ref}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="HEAD", help="the git ref to compare against (A)")
    p.add_argument("--configs", nargs="*", default=list(DEFAULT), choices=sorted(CONFIGS))
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--b-ref", help="measure this git ref as B instead of the working tree")
    p.add_argument("--a-src", type=Path, help="A's src/ folder, exported earlier (no git needed)")
    p.add_argument("--name", default="ab", help="output files: benchmarks/out/<name>.json, .png")
    p.add_argument("--counts-only", action="store_true",
                   help="only the host reads and operators per step (batch <= 8, one pair), "
                   "and those of a step that certifies")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.counts_only:
        os.environ["AB_COUNTS_ONLY"] = "1"
        args.pairs = 1
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return
    a_src = args.a_src.resolve() if args.a_src else export_ref(args.ref)
    b_src = export_ref(args.b_ref) if args.b_ref else ROOT / "src"
    b_name = f"{args.b_ref} ({b_src.parent.name})" if args.b_ref else "working tree"
    threads = os.environ.get("AB_THREADS", "1")
    print(f"A = {args.ref} ({a_src.parent.name}), B = {b_name}; {threads} thread(s), "
          f"device {DEVICE}", flush=True)  # fmt: skip
    rows = [compare(name, a_src, b_src, args.pairs) for name in args.configs]
    OUT.mkdir(parents=True, exist_ok=True)
    from common import machine

    result = {"ref": args.ref, "b": b_name, "machine": machine(), "rows": rows}
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    _plot(rows, OUT / f"{args.name}.png", args.ref, args.b_ref or "working tree")
    print(f"wrote {OUT / args.name}.json and .png")


if __name__ == "__main__":
    main()
