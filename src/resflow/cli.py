"""The ``resflow`` command line: a thin layer over the library.

    resflow train       [--data digits] [--preset digits-small] [--steps N] [--out DIR]
    resflow eval        --run DIR
    resflow sample      --run DIR [--n 64] [--temperature 1.0] [--out FILE]
    resflow interpolate --run DIR [--steps 8] [--out FILE]
    resflow presets

Every command maps onto a few library calls (see the README's Python examples).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from resflow.data import DataSplit, load_data
from resflow.evaluation import evaluate, interpolate, save_image_grid
from resflow.models.presets import PRESETS, get_preset, training_defaults
from resflow.models.residual_flow import (
    EstimatorConfig,
    ImageFlowConfig,
    ModelConfig,
    build_model,
    count_parameters,
)
from resflow.run import load_model
from resflow.training import TrainConfig, Trainer
from resflow.training.checkpoint import CheckpointError


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(cfg: ModelConfig, sets: dict[str, Any]) -> ModelConfig:
    """Replace model-config fields (``estimator.x`` for estimator fields)."""
    model_fields = {f.name for f in fields(cfg)}
    est_fields = {f.name for f in fields(EstimatorConfig)}
    top: dict[str, Any] = {}
    est: dict[str, Any] = {}
    for key, value in sets.items():
        if isinstance(value, list):
            value = tuple(value)
        if key.startswith("estimator."):
            name = key.split(".", 1)[1]
            if name not in est_fields:
                raise ValueError(
                    f"unknown estimator option {name!r}; choose from {sorted(est_fields)}"
                )
            est[name] = value
        elif key in model_fields and key != "estimator":
            top[key] = value
        else:
            raise ValueError(
                f"unknown model option {key!r} for {type(cfg).__name__}; choose from "
                f"{sorted(model_fields - {'estimator'})} or "
                f"estimator.<{'|'.join(sorted(est_fields))}>"
            )
    if est:
        top["estimator"] = replace(cfg.estimator, **est)
    return replace(cfg, **top)  # type: ignore[arg-type]


def _data(args: argparse.Namespace, seed: int) -> DataSplit:
    return load_data(
        args.data,
        args.data_dir,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=seed,
        download=args.download,
        n_bits=args.n_bits,
    )


def cmd_train(args: argparse.Namespace) -> int:
    data = _data(args, args.seed)
    preset = args.preset or ("toy2d" if data.levels is None and data.shape == (2,) else None)
    if preset is None:
        preset = {"digits": "digits-small", "mnist": "mnist-small"}.get(args.data)
    if preset is None:
        raise ValueError(f"choose a --preset for data {args.data!r}: {sorted(PRESETS)}")
    model_cfg = get_preset(preset)
    if isinstance(model_cfg, ImageFlowConfig):
        if data.levels is None:
            raise ValueError(
                f"preset {preset!r} is an image model; data {args.data!r} is not images"
            )
        model_cfg = replace(model_cfg, image_shape=data.shape, levels=data.levels)
    elif data.levels is not None:
        raise ValueError(f"preset {preset!r} is a vector model; data {args.data!r} are images")
    else:
        model_cfg = replace(model_cfg, dim=data.shape[0])
    model_cfg = apply_overrides(model_cfg, _parse_sets(args.set))
    rec = training_defaults(preset)
    paper = TrainConfig()

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return value if value is not None else rec.get(name, getattr(paper, name))

    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=pick("batch_size"),
        lr=pick("lr"),
        weight_decay=pick("weight_decay"),
        warmup=pick("warmup"),
        grad_clip=args.grad_clip,
        ema_decay=pick("ema_decay"),
        eval_every=args.eval_every,
        eval_max=args.eval_max,
        eval_batch_size=args.eval_batch_size,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        seed=args.seed,
        device=args.device,
        tensorboard=not args.no_tensorboard,
        progress=not args.no_progress,
    )
    out = Path(args.out or f"runs/{args.data}-{preset}")
    trainer = Trainer(model_cfg, data, train_cfg, out, resume=args.resume)
    (out / "data.yaml").write_text(
        yaml.safe_dump(
            {
                "data": args.data,
                "data_dir": str(args.data_dir) if args.data_dir else None,
                "n_train": args.n_train,
                "n_test": args.n_test,
                "seed": args.seed,
                "n_bits": args.n_bits,
            }
        )
    )
    n_params = count_parameters(trainer.model)
    print(
        f"resflow: training {preset} ({n_params:,} parameters) on {args.data} "
        f"{tuple(data.shape)} for {train_cfg.steps} steps -> {out}"
    )
    trainer.fit()
    result = trainer.evaluate(progress=not args.no_progress)
    print(f"test {result}")
    if data.levels is not None:
        imgs = trainer.sample(args.n_samples, args.temperature)
        scale = max(1, 128 // data.shape[-1])
        path = save_image_grid(imgs, out / "samples.png", data.levels, scale=scale)
        print(f"samples: {path}")
    elif data.shape == (2,):
        from resflow.data.toy2d import toy_entropy
        from resflow.plots import plot_density_2d

        limit = toy_entropy(args.data) if args.data in _toy_names() else None
        if limit is not None:
            print(f"entropy of the data (the limit of test NLL): {limit:.4f} nats")
        assert trainer.ema is not None
        with trainer.ema.swapped(trainer.model):
            plot_density_2d(
                trainer.model,
                data.test,
                out / "density.png",
                title=f"model, test NLL {result.mean:.3f}",
            )
        print(f"density plot: {out / 'density.png'}")
    print(f"learning curve: {out / 'curve.png'}")
    return 0


def _toy_names() -> tuple[str, ...]:
    from resflow.data.toy2d import TOY_DATASETS

    return TOY_DATASETS


def _run_data(run: Path, data_dir: str | None) -> DataSplit:
    path = run / "data.yaml"
    if not path.exists():
        raise CheckpointError(
            f"{run} has no data.yaml; is it a run folder written by `resflow train`?"
        )
    info = yaml.safe_load(path.read_text())
    return load_data(
        info["data"],
        data_dir or info.get("data_dir"),
        n_train=info["n_train"],
        n_test=info["n_test"],
        seed=info["seed"],
        n_bits=info.get("n_bits"),
    )


def cmd_eval(args: argparse.Namespace) -> int:
    run = Path(args.run)
    model = load_model(run, args.which)
    data = _run_data(run, args.data_dir)
    test = data.test if args.max is None else data.test[: args.max]
    torch.manual_seed(args.seed)
    result = evaluate(model, test, args.batch_size, progress=not args.no_progress)
    print(f"test {result}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    model = load_model(Path(args.run), args.which)
    if model.levels is None:
        raise ValueError("sample writes image grids; this run models vectors (use the library)")
    torch.manual_seed(args.seed)
    imgs = model.sample(args.n, args.temperature)
    scale = max(1, 128 // model.shape[-1])
    out = save_image_grid(imgs, args.out, model.levels, scale=scale)
    print(f"wrote {len(imgs)} samples at temperature {args.temperature} to {out}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    run = Path(args.run)
    model = load_model(run, args.which)
    if model.levels is None:
        raise ValueError("interpolate writes image grids; this run models vectors")
    data = _run_data(run, args.data_dir)
    torch.manual_seed(args.seed)
    idx = torch.randperm(len(data.test))[: 2 * args.pairs]
    rows = [
        interpolate(model, data.test[i], data.test[j], args.steps)
        for i, j in idx.view(-1, 2).tolist()
    ]
    scale = max(1, 96 // model.shape[-1])
    out = save_image_grid(torch.cat(rows), args.out, model.levels, nrow=args.steps, scale=scale)
    print(f"wrote {args.pairs} interpolation(s) of {args.steps} steps to {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name, cfg in PRESETS.items():
        n = count_parameters(build_model(cfg)) if args.count else None
        shape = getattr(cfg, "image_shape", None) or (getattr(cfg, "dim", "?"),)
        print(
            f"{name:14s} {type(cfg).__name__:16s} shape={tuple(shape)!s:14s}"
            + (f" {n:>12,} parameters" if n is not None else "")
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resflow", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a flow (default: the embedded 8x8 digits)")
    t.add_argument("--data", default="digits", help="toy density, image data set or .npy/.csv path")
    t.add_argument("--preset", default=None, help=f"model preset: {', '.join(PRESETS)}")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model option, e.g. --set n_blocks=[2,2] --set estimator.dist=geometric",
    )
    t.add_argument("--out", default=None, help="run folder (default runs/<data>-<preset>)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--warmup", type=int, default=None)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--ema-decay", type=float, default=None)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--eval-max", type=int, default=None, help="test examples in periodic evals")
    t.add_argument("--eval-batch-size", type=int, default=256)
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--sample-every", type=int, default=0)
    t.add_argument("--n-samples", type=int, default=64)
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--n-train", type=int, default=50_000, help="toy data: training points")
    t.add_argument("--n-test", type=int, default=10_000, help="toy data: test points")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-tensorboard", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="test bits/dim (or NLL) of a run, mean +- standard error")
    e.add_argument("--max", type=int, default=None, help="evaluate the first N test examples")
    e.add_argument("--batch-size", type=int, default=256)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="write a PNG grid of samples")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("interpolate", help="decode straight lines between test images' latents")
    i.add_argument("--pairs", type=int, default=4)
    i.add_argument("--steps", type=int, default=8)
    i.add_argument("--out", default="interpolation.png")
    i.set_defaults(func=cmd_interpolate)

    for q in (e, s, i):
        q.add_argument("--run", required=True, help="run folder written by `resflow train`")
        q.add_argument("--which", default="best", help="best or last checkpoint")
        q.add_argument("--seed", type=int, default=0)
    for q in (t, e, i):
        q.add_argument("--data-dir", default=None, help="folder with downloaded data sets")
    t.add_argument("--download", action="store_true", help="download missing data (checksummed)")
    t.add_argument("--n-bits", type=int, default=None, help="reduce images to n bits")
    for q in (t, e):
        q.add_argument("--no-progress", action="store_true")

    pr = sub.add_parser("presets", help="list model presets")
    pr.add_argument("--count", action="store_true", help="build each and count parameters")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"resflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume (last.pt is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
