"""Paper §5 / Table 4 at small scale: hybrid Residual Flows with lambda in {0, 1/D, 1}.

    python benchmarks/hybrid.py --steps 300   # about 4 minutes on 2 cores
    python benchmarks/hybrid.py --tiny        # seconds (the test suite)

The preset ``hybrid-digits`` (a 2-scale Residual Flow with a classifier branch after
the squeeze and at the end) trained on the 8x8 digits with the objective
``lambda log p(x) + log p(y|x)`` for the same number of steps (same seed and batches) at
``lambda = 0`` (a pure classifier on the flow's features), ``1/D`` and ``1``; test
accuracy and bits/dim of the EMA model on the 297 test digits.

Output: ``benchmarks/out/hybrid.json`` and ``hybrid.png``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from common import OUT, machine, save_json

from resflow.data import DataConfig
from resflow.models import get_preset
from resflow.models.registry import PRESETS
from resflow.training import Trainer

LAMBDAS = {"0": (0.0, False), "1/D": (1.0, True), "1": (1.0, False)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    steps = 2 if args.tiny else args.steps
    tiny = dict(n_blocks=(1, 1), hidden=8, head_channels=8) if args.tiny else {}
    preset = PRESETS.get("hybrid-digits")
    rows = []
    for label, (weight, per_dim) in LAMBDAS.items():
        cfg = get_preset("hybrid-digits", density_weight=weight, per_dim=per_dim, **tiny)
        train = replace(preset.train, steps=steps, eval_every=steps, progress=False,
                        tensorboard=False, eval_max=32 if args.tiny else None)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = Trainer(cfg, DataConfig(name="digits"), train, tmp).fit().final
            secs = time.perf_counter() - t0
        assert res is not None and res.accuracy is not None
        rows.append({"lambda": label, "steps": steps, "accuracy": res.accuracy,
                     "test_bpd": res.mean, "stderr": res.stderr, "n": res.n,
                     "seconds": secs})  # fmt: skip
        print(f"lambda = {label:4s} {steps} steps: test {res} ({secs:.0f} s)", flush=True)
    name = "hybrid_tiny" if args.tiny else "hybrid"
    save_json(name, {"machine": machine(), "rows": rows})
    _plot(rows, OUT / f"{name}.png")
    print(f"wrote {OUT / (name + '.json')} and {OUT / (name + '.png')}")
    return {"rows": rows}


def _plot(rows: list[dict], path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    labels = [f"lambda = {r['lambda']}" for r in rows]
    a.bar(labels, [100 * r["accuracy"] for r in rows], color="C0")
    a.set_ylabel("test accuracy (%)")
    b.bar(labels, [r["test_bpd"] for r in rows], yerr=[r["stderr"] for r in rows], color="C1")
    b.set_ylabel("test bits/dim")
    for ax in (a, b):
        ax.set_title(f"hybrid-digits, {rows[0]['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
