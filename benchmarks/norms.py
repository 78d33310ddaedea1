"""Paper Appendix D: the choice of induced norm for the Lipschitz constraint, on 2-D data.

    python benchmarks/norms.py --data checkerboard --steps 400   # about 3 minutes, 2 cores
    python benchmarks/norms.py --tiny                            # seconds (the test suite)

The same 2-D Residual Flow (10 blocks of a 64-64 LipSwish MLP, coefficient 0.98, exact
logdet) constrained in ``||.||_2`` (spectral norm), in ``||.||_inf`` (max row sums), and
with mixed norms learned jointly with the model (orders initialized at 2), each trained
for the same number of steps on the same data (same seed and batches); test NLL on 10,000
fresh points against the data's entropy, and the learned densities.

Output: ``benchmarks/out/norms_<data>.json`` and ``norms_<data>.png``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import OUT, machine, save_json

from resflow.data import DataConfig, load_data
from resflow.data.toy2d import toy_entropy
from resflow.evaluation import evaluate
from resflow.layers.base import after_optimizer_step
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.models import build_model
from resflow.models.residual_flow import VectorFlowConfig
from resflow.training import Batch, MaximumLikelihood, TrainConfig
from resflow.training.trainer import make_optimizer

INF = math.inf
_EXACT = EstimatorConfig(train_method="exact", eval_method="exact")


def variants(n_blocks: int, hidden: int) -> dict[str, VectorFlowConfig]:
    base = dict(dim=2, n_blocks=n_blocks, hidden=(hidden, hidden), coeff=0.98, estimator=_EXACT)
    return {
        "p = 2": VectorFlowConfig(**base),
        "p = inf": VectorFlowConfig(**base, norm_orders=(INF, INF, INF)),
        "learned mixed norms": VectorFlowConfig(
            **base, norm_orders=(2.0, 2.0, 2.0), learn_orders=True
        ),  # fmt: skip
    }


def train_one(cfg: VectorFlowConfig, data, steps: int, batch: int, lr: float):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0))
    objective = MaximumLikelihood(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(data.train[:batch])
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(data.train), (batch,), generator=gen)
        loss, _ = objective(model, Batch(data.train[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        after_optimizer_step(model)
    return model, time.perf_counter() - t0


def density(model, lim: float = 4.0, n: int = 120) -> torch.Tensor:  # type: ignore[no-untyped-def]
    model.eval()
    ax = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(ax, ax, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        logp = torch.cat([model.log_prob(c) for c in pts.split(4096)])
    return logp.exp().view(n, n)


def learned_orders(model) -> list[float]:  # type: ignore[no-untyped-def]
    from resflow.layers.residual.lipschitz_layers import LipschitzLinear
    from resflow.layers.residual.norms import NormOrder

    out = []
    for m in model.modules():
        if isinstance(m, LipschitzLinear):
            p = getattr(m, "domain", None)
            if isinstance(p, NormOrder):
                out.append(float(p.value().detach()))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="checkerboard")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    steps, n_blocks, hidden, batch, n_test = (2, 2, 8, 64, 256) if args.tiny else (
        args.steps, 10, 64, 500, 10_000)  # fmt: skip
    data = load_data(DataConfig(name=args.data, n_train=50_000, n_test=n_test))
    entropy = toy_entropy(args.data)
    rows, dens = [], {}
    for label, cfg in variants(n_blocks, hidden).items():
        model, secs = train_one(cfg, data, steps, batch, lr=1e-2)
        res = evaluate(model, data.test, 2000)
        orders = learned_orders(model) if cfg.learn_orders else []
        rows.append({"norm": label, "steps": steps, "test_nll": res.mean, "stderr": res.stderr,
                     "gap_to_entropy": res.mean - entropy, "seconds": secs,
                     "learned_orders": orders})  # fmt: skip
        dens[label] = density(model, n=40 if args.tiny else 120)
        extra = f", learned orders {min(orders):.2f}..{max(orders):.2f}" if orders else ""
        print(f"{label:20s} test NLL {res} (entropy {entropy:.4f}), {secs:.0f} s{extra}",
              flush=True)  # fmt: skip
    name = f"norms_{args.data}" + ("_tiny" if args.tiny else "")
    save_json(name, {"machine": machine(), "data": args.data, "entropy": entropy, "rows": rows})
    _plot(data.test, dens, rows, entropy, OUT / f"{name}.png")
    print(f"wrote {OUT / (name + '.json')} and {OUT / (name + '.png')}")
    return {"rows": rows, "entropy": entropy}


def _plot(test, dens, rows, entropy, path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dens) + 1, figsize=(3.3 * (len(dens) + 1), 3.4))
    axes[0].hist2d(test[:, 0].numpy(), test[:, 1].numpy(), bins=120,
                   range=[[-4, 4], [-4, 4]], cmap="viridis")  # fmt: skip
    axes[0].set_title(f"data (entropy {entropy:.3f})")
    for ax, (label, d), r in zip(axes[1:], dens.items(), rows):
        ax.imshow(d.numpy(), origin="lower", extent=(-4, 4, -4, 4), cmap="viridis")
        ax.set_title(f"{label}\ntest NLL {r['test_nll']:.3f}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
