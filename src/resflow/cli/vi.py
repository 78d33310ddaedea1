"""``resflow vi``: fit a flow to an unnormalized target density by reverse KL."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from resflow.config import override, parse_sets
from resflow.models import MODELS, PRESETS, count_parameters, default_preset, resolve_model
from resflow.runs import check_result_folder

FIT_FILES = ("result.json", "fit.png")
"""What a fit writes in its ``--out`` folder."""


def cmd_vi(args: argparse.Namespace) -> int:
    """Fit a flow to an unnormalized target density by reverse KL (sampling direction)."""
    import json

    from resflow.io import atomic_write_text
    from resflow.vi import estimate_kl, fit_reverse_kl, make_target, sampling_direction

    target = make_target(args.target, args.dim)
    if args.preset:
        preset = PRESETS.get(args.preset)
        entry = MODELS.get(preset.model)
        cfg = preset.config
    else:
        entry = resolve_model(args.model, "vector")
        chosen = default_preset(entry, "vector")
        cfg = chosen.config if chosen is not None else entry.config()
    if entry.kind != "vector":
        raise ValueError(f"--model {entry.name} models images; reverse KL needs a vector model")
    cfg = override(entry.adapt(cfg, (target.dim,), None), parse_sets(args.set))
    out = Path(args.out or f"runs/vi-{target.name}-{entry.name}")
    check_result_folder(out, "--out", args.overwrite, FIT_FILES)  # before any training
    torch.manual_seed(args.seed)
    q = sampling_direction(entry.build(cfg))
    print(f"resflow: fitting {entry.name} ({count_parameters(q):,} parameters) to "
          f"{target.name} ({target.dim}-D) by reverse KL for {args.steps} steps")  # fmt: skip
    history = fit_reverse_kl(q, target, args.steps, args.batch_size, args.lr,
                             progress=not args.no_progress, seed=args.seed,
                             anneal=args.anneal)  # fmt: skip
    est = estimate_kl(q, target, args.n_eval)
    print(est)
    out.mkdir(parents=True, exist_ok=True)
    record = {"target": target.name, "dim": target.dim, "model": entry.name,
              "steps": args.steps, "kl": est.kl, "stderr": est.stderr, "ess": est.ess,
              "log_z_estimate": est.log_z, "history": history}  # fmt: skip
    atomic_write_text(out / "result.json", json.dumps(record, indent=1))
    if target.dim == 2:
        from resflow.plots import plot_target_fit

        with torch.no_grad():
            samples = q.sample(20_000)
        plot_target_fit(target, samples, out / "fit.png", title=str(est).split(",")[0])
        print(f"target and samples: {out / 'fit.png'}")
    else:  # an overwritten 2-D fit's plot would not describe this fit
        (out / "fit.png").unlink(missing_ok=True)
    print(f"record: {out / 'result.json'}")
    return 0
