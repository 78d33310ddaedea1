"""Flows for variational inference: reverse-KL fits to the test energies, and a VAE on
dynamically binarized MNIST with flow posteriors.

    python benchmarks/vi.py --task targets --steps 400
    python benchmarks/vi.py --task vae --budget 90 [--data-dir ../shared/data/mnist]

``targets``: IAF-DDSF (the ``naf-toy2d`` preset in its sampling direction), RealNVP
(``realnvp-toy2d``) and the residual flow (``toy2d``, sampling through its forward pass)
fitted by reverse KL to two-moons, ring-mixture, banana and the 2-D funnel; the KL
estimate (the targets' normalizers are known), the effective sample size, and a figure
of each target beside each fit's samples. ``vae``: the same VAE with each posterior
trained for the same wall-clock budget; test ELBO and the importance-weighted bound
(K=100) beside the NAF paper's table. One thread. Writes ``benchmarks/out/vi_<task>.json``
and ``vi_targets.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import OUT, machine, save_json  # noqa: E402

from resflow.data.images import load_images  # noqa: E402
from resflow.models import build_model, get_preset  # noqa: E402
from resflow.vi import (  # noqa: E402
    VAE,
    VAEConfig,
    binarize,
    estimate_kl,
    evaluate_vae,
    fit_reverse_kl,
    fit_vae,
    make_target,
    sampling_direction,
)

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
FLOWS = {"IAF-DDSF": "naf-toy2d", "RealNVP": "realnvp-toy2d", "residual flow": "toy2d"}
TARGET_NAMES = ("two-moons", "ring-mixture", "banana", "funnel")
#: The NAF paper's Table 1 (MNIST VAE, nats): ELBO, log p(x).
SEED_TABLE = {"gaussian": (-85.00, -81.66), "iaf-affine": (-82.25, -80.05),
              "iaf-dsf": (-81.92, -79.86)}  # fmt: skip


def run_targets(steps: int, anneal: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fig, axes = plt.subplots(len(TARGET_NAMES), 1 + len(FLOWS), figsize=(13, 12))
    for row, name in enumerate(TARGET_NAMES):
        target = make_target(name)
        lim = target.lim
        g = torch.linspace(-lim, lim, 200)
        xy = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
        axes[row, 0].imshow(target(xy).exp().reshape(200, 200), origin="lower",
                            extent=(-lim, lim, -lim, lim), cmap="magma")  # fmt: skip
        axes[row, 0].set_title(f"{name} (target)")
        out[name] = []
        for col, (label, preset) in enumerate(FLOWS.items(), start=1):
            torch.manual_seed(0)
            q = sampling_direction(build_model(get_preset(preset)))
            t0 = time.perf_counter()
            fit_reverse_kl(q, target, steps=steps, batch_size=256, lr=3e-3, progress=False,
                           anneal=anneal, beta0=0.05)  # fmt: skip
            fit_s = time.perf_counter() - t0
            est = estimate_kl(q, target, 10_000)
            with torch.no_grad():
                s = q.sample(20_000).numpy()
            axes[row, col].hist2d(s[:, 0], s[:, 1], bins=150, range=[[-lim, lim]] * 2,
                                  cmap="magma")  # fmt: skip
            axes[row, col].set_title(f"{label}: KL {est.kl:.3f}, ESS {est.ess:.2f}")
            out[name].append({"flow": label, "preset": preset, "steps": steps, "fit_s": fit_s,
                              "anneal": anneal, "kl": est.kl, "kl_stderr": est.stderr,
                              "ess": est.ess, "log_z_estimate": est.log_z})  # fmt: skip
            print(f"  {name:12s} {label:14s} {fit_s:6.1f} s  {est}", flush=True)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / f"vi_targets{'_anneal' if anneal else ''}.png", dpi=80)
    return out


def run_vae(budget: float, data_dir: str, k: int, n_test: int) -> dict[str, Any]:
    train = load_images("mnist", "train", data_dir, progress=False)
    test = load_images("mnist", "test", data_dir, progress=False)
    test_x = binarize(test.images[:n_test], 256, torch.Generator().manual_seed(0))
    rows = []
    for posterior in ("gaussian", "iaf-affine", "iaf-dsf", "residual"):
        torch.manual_seed(0)
        vae = VAE(VAEConfig(posterior=posterior))
        t0 = time.perf_counter()
        hist = fit_vae(vae, train.images, steps=10**9, batch_size=100, lr=1e-3,
                       progress=False, max_seconds=budget)  # fmt: skip
        train_s = time.perf_counter() - t0
        res = evaluate_vae(vae, test_x, k=k)
        paper = SEED_TABLE.get(posterior)
        rows.append({"posterior": posterior, "steps": len(hist), "train_s": train_s,
                     "elbo": res.elbo, "elbo_stderr": res.elbo_stderr,
                     "log_likelihood": res.log_likelihood,
                     "log_likelihood_stderr": res.log_likelihood_stderr, "k": k, "n": res.n,
                     "paper_elbo": paper and paper[0],
                     "paper_log_likelihood": paper and paper[1]})  # fmt: skip
        print(f"  {posterior:11s} {len(hist):5d} steps  {res}", flush=True)
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=("targets", "vae"), default="targets")
    p.add_argument("--steps", type=int, default=400, help="reverse-KL steps per fit")
    p.add_argument("--anneal", type=int, default=0, help="annealing steps (beta 0.05 -> 1)")
    p.add_argument("--budget", type=float, default=90.0, help="VAE training seconds")
    p.add_argument("--k", type=int, default=100, help="importance samples per test image")
    p.add_argument("--n-test", type=int, default=1000, help="test images")
    p.add_argument("--data-dir", default=str(MNIST_DIR))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"task": args.task, "machine": machine()}
    if args.task == "targets":
        out.update(run_targets(args.steps, args.anneal))
    else:
        out["budget_s"] = args.budget
        out.update(run_vae(args.budget, args.data_dir, args.k, args.n_test))
    tag = f"vi_{args.task}" + ("_anneal" if args.anneal else "")
    print(f"wrote {save_json(tag, out)}")


if __name__ == "__main__":
    main()
