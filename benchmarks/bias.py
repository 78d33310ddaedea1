"""Paper Fig. 2: the bias of the truncated (i-ResNet) log-determinant against the
unbiased Russian-roulette estimator, and what it does to training.

    python benchmarks/bias.py                # both parts, about 3 minutes on 2 cores
    python benchmarks/bias.py --part blocks  # estimator bias only
    python benchmarks/bias.py --tiny         # seconds (the test suite)

Part 1 (``blocks``): residual blocks ``x + g(x)`` of dimension ``d`` whose branch has
Lipschitz bound ``L`` (two spectrally normalized layers of orthogonal weights, each at
``sqrt(L)``, and a nearly ReLU-like LipSwish); for points ``x ~ N(0, I)`` the mean
estimate of ``log det(I + J_g(x))`` over many Hutchinson/roulette draws minus the exact
value (dense Jacobian + slogdet), with its standard error. Truncation after ``n`` terms
drops ``sum_{k>n} (-1)^{k+1} tr(J^k)/k``, which grows with ``L`` and ``d``; the roulette
estimate is unbiased at every ``L``.

Part 2 (``training``): a 2-D Residual Flow (coefficient 0.99) trained on checkerboard
data twice, with the truncated 2-term estimator and with the unbiased one; every few
steps the training objective (the estimator's NLL) and the true NLL (exact logdet) of a
fixed held-out batch. With truncation the objective drifts away from the true NLL as
the blocks grow more expressive; the unbiased objective tracks it.

Output: ``benchmarks/out/bias.json`` and ``bias.png`` (``bias_tiny.*`` with ``--tiny``).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import OUT, machine, save_json

from resflow.data import DataConfig, load_data
from resflow.layers.base import after_optimizer_step
from resflow.layers.residual.activations import LipSwish
from resflow.layers.residual.lipschitz_layers import LipschitzLinear
from resflow.layers.residual.logdet import EstimatorConfig, LogdetEstimator, estimate_logdet
from resflow.layers.residual.spectral import refresh_lipschitz
from resflow.models import build_model
from resflow.models.residual_flow import VectorFlowConfig
from resflow.nets import residual_mlp
from resflow.training import Batch, MaximumLikelihood, TrainConfig
from resflow.training.trainer import make_optimizer

ESTIMATORS = {
    "truncated, 2 terms": LogdetEstimator(n_exact_terms=2, dist="none"),
    "truncated, 5 terms (i-ResNet)": LogdetEstimator(n_exact_terms=5, dist="none"),
    "truncated, 10 terms": LogdetEstimator(n_exact_terms=10, dist="none"),
    "roulette, 2 exact + Geom(0.5)": LogdetEstimator(n_exact_terms=2, dist="geometric"),
    "roulette, 2 exact + Poisson(2)": LogdetEstimator(n_exact_terms=2, dist="poisson"),
}


def branch(d: int, lip: float, seed: int = 0) -> torch.nn.Module:
    """``g`` with ``Lip(g) <= lip``: two layers of orthogonal weights at ``sqrt(lip)``."""
    torch.manual_seed(seed)
    g = residual_mlp(d, (d,), coeff=math.sqrt(lip), preact=False)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, LipschitzLinear):
                q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
                m.weight.copy_(3 * q.float())
            if isinstance(m, LipSwish):
                m.b.fill_(5.0)
    refresh_lipschitz(g, atol=1e-9, rtol=1e-9, max_iter=10_000)
    return g.double().eval()


def _estimate(gx: torch.Tensor, x: torch.Tensor, est: LogdetEstimator) -> torch.Tensor:
    return estimate_logdet(gx, x, est, 0.5, 2.0, False).detach()


def exact(g: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    jac = torch.func.vmap(torch.func.jacrev(lambda t: g(t[None])[0]))(x)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.slogdet(eye + jac)[1].detach()


def estimator_bias(dims: list[int], lips: list[float], n_points: int, draws: int) -> list[dict]:
    rows = []
    for d in dims:
        for lip in lips:
            g = branch(d, lip)
            x = torch.randn(
                n_points, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
            )
            true = exact(g, x)
            xr = x.repeat(draws, 1).requires_grad_(True)
            gx = g(xr)
            for name, est in ESTIMATORS.items():
                torch.manual_seed(2)
                # one roulette draw per call: average calls so that the number of terms varies
                calls = draws if est.dist != "none" else 1
                vals = torch.stack(
                    [_estimate(gx, xr, est).view(draws, n_points) for _ in range(calls)]
                ).flatten(0, 1)
                err = vals - true
                per_point = err.mean(0)
                rows.append({"dim": d, "lip": lip, "estimator": name,
                             "exact_mean": float(true.mean()), "bias": float(per_point.mean()),
                             "stderr": float(err.std() / math.sqrt(err.numel()))})  # fmt: skip
            print(f"d={d:3d} Lip<={lip:.2f}  exact {float(true.mean()):8.4f}  " + "  ".join(
                f"{r['estimator'][:14]}: {r['bias']:+.4f}"
                for r in rows[-len(ESTIMATORS):]), flush=True)  # fmt: skip
    return rows


def drift(steps: int, every: int, n_blocks: int, hidden: int, batch: int) -> dict[str, list]:
    data = load_data(DataConfig(name="checkerboard", n_train=20_000, n_test=2_000))
    held = data.test
    out: dict[str, list] = {}
    for label, train in [("truncated, 2 terms", dict(n_exact_terms=2, dist="none")),
                         ("unbiased (2 exact + Poisson(2))", dict(n_exact_terms=2,
                                                                  dist="poisson"))]:  # fmt: skip
        torch.manual_seed(0)
        est = EstimatorConfig(train_method="series", eval_method="exact", **train)
        cfg = VectorFlowConfig(
            dim=2, n_blocks=n_blocks, hidden=(hidden, hidden), coeff=0.99, estimator=est
        )
        model = build_model(cfg)
        opt = make_optimizer(model, TrainConfig(lr=5e-3, weight_decay=0.0))
        objective = MaximumLikelihood(model)
        with torch.no_grad():
            model(data.train[:batch])
        hist = []
        t0 = time.perf_counter()
        for step in range(steps + 1):
            if step % every == 0:
                model.train()
                torch.manual_seed(10_000 + step)
                est = float(-model.log_prob(held).detach().mean())
                model.eval()
                true = float(-model.log_prob(held).detach().mean())
                model.train()
                hist.append({"step": step, "objective": est, "true": true})
                print(f"{label:32s} step {step:4d}: objective {est:.4f}, true NLL {true:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            if step == steps:
                break
            idx = torch.randint(0, len(data.train), (batch,))
            loss, _ = objective(model, Batch(data.train[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            after_optimizer_step(model)
        out[label] = hist
    return out


def plot(rows: list[dict], curves: dict[str, list], path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["dim"] for r in rows})
    n = len(dims) + (1 if curves else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for name in ESTIMATORS:
            sel = [r for r in rows if r["dim"] == d and r["estimator"] == name]
            lips, biases = [r["lip"] for r in sel], [r["bias"] for r in sel]
            yerr = [2 * r["stderr"] for r in sel]
            ax.errorbar(lips, biases, yerr=yerr, marker="o", ms=3, label=name)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("Lipschitz bound of g")
        ax.set_ylabel("estimate - exact logdet (nats)")
        ax.set_title(f"bias of the logdet, d = {d}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if curves:
        ax = axes[0][-1]
        for (label, hist), color in zip(curves.items(), ("C3", "C0")):
            steps = [h["step"] for h in hist]
            ax.plot(steps, [h["objective"] for h in hist], "--", color=color,
                    label=f"{label}: objective")  # fmt: skip
            ax.plot(steps, [h["true"] for h in hist], "-", color=color, label=f"{label}: true NLL")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out NLL (nats)")
        ax.set_title("2-D checkerboard, coeff 0.99")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", "blocks", "training"), default="all")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (tests)")
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args(argv)
    if args.tiny:
        dims, lips, n_points, draws = [2, 4], [0.5, 0.9], 8, 4
        steps, every, n_blocks, hidden, batch = 4, 2, 2, 8, 64
    else:
        dims, lips, n_points, draws = [2, 8, 32], [0.5, 0.8, 0.9, 0.99], 32, 200
        steps, every, n_blocks, hidden, batch = args.steps, 20, 8, 64, 500
    rows = estimator_bias(dims, lips, n_points, draws) if args.part != "training" else []
    curves = drift(steps, every, n_blocks, hidden, batch) if args.part != "blocks" else {}
    name = "bias_tiny" if args.tiny else "bias"
    result = {"machine": machine(), "blocks": rows, "training": curves}
    save_json(name, result)
    OUT.mkdir(parents=True, exist_ok=True)
    plot(rows, curves, OUT / f"{name}.png")
    print(f"wrote {OUT / (name + '.json')} and {OUT / (name + '.png')}")
    return result


if __name__ == "__main__":
    main()
