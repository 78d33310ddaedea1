"""Paper Fig. 4 and Table 3: the activations' derivatives, and ELU vs LipSwish training.

    python benchmarks/activations.py --steps 300   # about 3 minutes on 2 cores
    python benchmarks/activations.py --tiny        # seconds (the test suite)

Part 1: ``f``, ``f'`` and ``f''`` of resflow's ELU, softplus and LipSwish (by autograd
on the library's own modules) on ``[-4, 4]``. A 1-Lipschitz activation whose ``|f'|``
reaches 1 only where ``f'' = 0`` (ELU for z > 0) makes the gradient of the logdet
vanish exactly where the Lipschitz bound is tight ("derivative saturation", paper
§3.3); LipSwish keeps ``|f'| <= 1`` with a non-zero second derivative.

Part 2: the same Residual Flow (preset ``digits-small``) trained with ELU and with
LipSwish for the same number of steps on the 8x8 digits, same seed and data order, then
test bits/dim of the EMA model (20 exact terms + unbiased tail).

Output: ``benchmarks/out/activations.json`` and ``activations.png``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import OUT, machine, save_json

from resflow.data import DataConfig
from resflow.layers.residual.activations import make_activation
from resflow.models import get_preset
from resflow.models.registry import PRESETS
from resflow.training import Trainer

NAMES = ("elu", "softplus", "lipswish")


def derivatives(n: int = 801) -> dict[str, dict[str, list[float]]]:
    z = torch.linspace(-4, 4, n, dtype=torch.float64, requires_grad=True)
    out: dict[str, dict[str, list[float]]] = {}
    for name in NAMES:
        f = make_activation(name).double()
        y = f(z)
        (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), z)
        out[name] = {"z": z.detach().tolist(), "f": y.detach().tolist(),
                     "d1": d1.detach().tolist(), "d2": d2.detach().tolist()}  # fmt: skip
    return out


def summary(curves: dict[str, dict[str, list[float]]]) -> list[dict]:
    rows = []
    for name, c in curves.items():
        d1, d2 = torch.tensor(c["d1"]), torch.tensor(c["d2"])
        # saturated: the Lipschitz bound is (nearly) tight and the curvature gone
        saturated = (d1.abs() >= 0.95) & (d2.abs() < 1e-2)
        rows.append({"activation": name, "max_abs_d1": float(d1.abs().max()),
                     "saturated_fraction": float(saturated.double().mean()),
                     "min_d1": float(d1.min())})  # fmt: skip
    return rows


def ablation(steps: int, tiny: bool) -> list[dict]:
    rows = []
    base = PRESETS.get("digits-small")
    for act in ("elu", "lipswish"):
        kw = dict(n_blocks=(1, 1), hidden=8, fc_blocks=1, fc_hidden=(8,)) if tiny else {}
        cfg = get_preset("digits-small", activation=act, **kw)
        from dataclasses import replace

        train = replace(base.train, steps=steps, eval_every=steps, progress=False,
                        tensorboard=False, eval_max=32 if tiny else None)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            trainer = Trainer(cfg, DataConfig(name="digits"), train, tmp)
            res = trainer.fit().final
            secs = time.perf_counter() - t0
        assert res is not None
        rows.append({"activation": act, "steps": steps, "test_bpd": res.mean,
                     "stderr": res.stderr, "n": res.n, "seconds": secs})  # fmt: skip
        print(f"{act:9s} {steps} steps: test {res} ({secs:.0f} s)", flush=True)
    return rows


def plot(curves: dict, rows: list[dict], path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 if rows else 3, figsize=(15 if rows else 11, 3.2))
    for key, ax, title in zip(("f", "d1", "d2"), axes, ("f(z)", "f'(z)", "f''(z)")):
        for name, c in curves.items():
            ax.plot(c["z"], c[key], label=name)
        ax.set_title(title)
        ax.set_xlabel("z")
        ax.grid(alpha=0.3)
    axes[1].axhline(1, color="k", lw=0.5, ls=":")
    axes[0].legend(fontsize=8)
    if rows:
        ax = axes[3]
        ax.bar([r["activation"] for r in rows], [r["test_bpd"] for r in rows],
               yerr=[r["stderr"] for r in rows], color=["C0", "C2"])  # fmt: skip
        lo = min(r["test_bpd"] for r in rows)
        ax.set_ylim(lo - 0.3, lo + 0.3)
        ax.set_ylabel("test bits/dim")
        ax.set_title(f"digits-small, {rows[0]['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--no-training", action="store_true", help="derivatives only")
    args = p.parse_args(argv)
    curves = derivatives(81 if args.tiny else 801)
    table = summary(curves)
    for r in table:
        print(f"{r['activation']:9s} max|f'| {r['max_abs_d1']:.4f}, min f' {r['min_d1']:+.4f}, "
              f"share of [-4, 4] with |f'| >= 0.95 and |f''| < 0.01: "
              f"{r['saturated_fraction']:.3f}")  # fmt: skip
    rows = [] if args.no_training else ablation(2 if args.tiny else args.steps, args.tiny)
    name = "activations_tiny" if args.tiny else "activations"
    result = {"machine": machine(), "derivatives": table, "ablation": rows}
    save_json(name, result)
    plot(curves, rows, OUT / f"{name}.png")
    print(f"wrote {OUT / (name + '.json')} and {OUT / (name + '.png')}")
    return result


if __name__ == "__main__":
    main()
