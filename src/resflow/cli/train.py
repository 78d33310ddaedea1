"""``resflow train`` (and ``resflow presets``): a run's settings from the flags, a preset
or its record, then :class:`~resflow.training.Trainer` and the run's figures."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from resflow.cli.checks import check_toy_size, torch_device
from resflow.cli.common import report_benchmark
from resflow.config import given_flags, override, parse_sets, replace
from resflow.data import DataConfig, data_kind, load_data
from resflow.evaluation import save_image_grid, save_temperature_grids
from resflow.models import (
    MODELS,
    PRESETS,
    count_parameters,
    default_preset,
    entry_for,
    families,
    presets_of,
    resolve_model,
)
from resflow.models.configs import (
    ClassConditionalConfig,
    is_class_conditional,
    is_image_config,
    is_vector_config,
)
from resflow.preprocess.noise import GaussianNoise
from resflow.runs import RunFolder, recorded_settings, restart_note, resume_note
from resflow.train_config import TrainConfig
from resflow.training import Trainer
from resflow.training.distributed import launched_by_torchrun, load_shared, setup

REDUCED_T = 0.7
"""The second panel of the sample grid that `train` writes (as in the Glow paper)."""
DATA_FLAGS = {"name": "data"}
DATA_EXCLUDE = ("seed",)  # the data seed is the run's --seed


def _choose(args: argparse.Namespace, data_name: str) -> tuple[Any, Any]:
    """``(model entry, preset or None)`` from ``--preset`` / ``--model`` and the data."""
    kind = data_kind(data_name)
    if args.preset is not None:
        preset = PRESETS.get(args.preset)
        entry = MODELS.get(preset.model)
        if args.model is not None and args.model not in (entry.name, entry.family):
            raise ValueError(
                f"--preset {preset.name} is a {entry.name} preset, not --model {args.model}"
            )
        return entry, preset
    entry = resolve_model(args.model or "residual-flow", kind)  # type: ignore[arg-type]
    preset = default_preset(entry, data_name)
    if preset is None and args.model is None:
        names = ", ".join(p.name for p in presets_of(entry.name))
        raise ValueError(f"choose a --preset for data {data_name!r} (e.g. {names})")
    return entry, preset


def cmd_train(args: argparse.Namespace) -> int:
    train_flags = given_flags(args, TrainConfig)
    data_flags = given_flags(args, DataConfig, DATA_FLAGS)
    if "seed" in train_flags:
        data_flags["seed"] = train_flags["seed"]
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    data_cfg = DataConfig(**data_flags)
    entry, preset = _choose(args, data_cfg.name)
    model_cfg = preset.config if preset is not None else entry.config()
    sets = parse_sets(args.set)
    if args.dequantization is not None:
        sets = {"dequantization.kind": args.dequantization, **sets}
    model_cfg = override(model_cfg, sets)  # type and range errors before any data is loaded
    train_cfg = replace(preset.train if preset is not None else TrainConfig(), **train_flags)
    label = preset.name if preset is not None else entry.name
    out = Path(args.out or f"runs/{Path(data_cfg.name).stem}-{label}")
    run = RunFolder(out)
    resumed = args.resume and run.config_file.exists()
    if resumed:  # the run's own records, changed only by what is given explicitly
        recorded = recorded_settings(run, data_flags, train_flags, sets)
        model_cfg, data_cfg, train_cfg = recorded.model, recorded.data, recorded.train
        if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
            print(f"resflow: {resume_note(run)}")
    check_toy_size(data_cfg)

    if launched_by_torchrun():  # one copy of the data per machine, not per process
        data = load_shared(data_cfg, setup(torch_device(train_cfg.device)))
    else:
        data = load_data(data_cfg)
    if not resumed:
        model_cfg = override(entry.adapt(model_cfg, data.shape, data.levels), sets)
        if data.context_features:  # conditioned on the data's context columns
            if not is_vector_config(model_cfg):
                raise ValueError(f"--context-columns: model {entry.name} models images")
            model_cfg = replace(model_cfg, context_features=data.context_features)
        if args.conditional:
            model_cfg = _conditional(model_cfg, entry.name, data)
    trainer = Trainer(model_cfg, data, train_cfg, out, resume=args.resume, overwrite=args.overwrite)
    if not trainer.dist.is_main:  # another rank of a torchrun launch: train and evaluate
        final = trainer.fit().final
        if final is None or final.n != len(data.test):
            trainer.evaluate()
        return 0
    if trainer.restarted and not resumed:
        print(f"resflow: {restart_note(run)}")
    n_params = count_parameters(trainer.model)
    world = trainer.dist.world_size
    print(
        f"resflow: training {label} ({entry_for(model_cfg).name}, {n_params:,} parameters) on "
        f"{data.name} {tuple(data.shape)} for {train_cfg.steps} steps -> {out}"
        + (f" on {world} processes" if world > 1 else "")
    )
    result = trainer.fit().final
    if result is None or result.n != len(data.test):
        result = trainer.evaluate(progress=train_cfg.progress)
    print(f"test {result}")
    report_benchmark(data.name, result, model_cfg)
    if data.levels is not None:
        scale = max(1, 128 // data.shape[-1])
        temps = [args.temperature] + ([REDUCED_T] if args.temperature != REDUCED_T else [])
        grids = [(t, trainer.sample(train_cfg.n_samples, t)) for t in temps]
        path = save_temperature_grids(grids, out / "samples.png", data.levels, scale=scale)
        print(f"samples at T = {', '.join(f'{t:g}' for t in temps)}: {path}")
        if any(isinstance(m, GaussianNoise) for m in trainer.model.modules()):
            imgs = trainer.sample(train_cfg.n_samples, args.temperature, denoise=True)
            path = save_image_grid(imgs, out / "samples_denoised.png", data.levels, scale=scale)
            print(f"samples after one-step denoising: {path}")
    elif data.shape == (2,) and not data.context_features:
        from resflow.data.toy2d import TOY_DATASETS, toy_entropy
        from resflow.plots import plot_density_2d

        limit = toy_entropy(data.name) if data.name in TOY_DATASETS else None
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


def _conditional(model_cfg: Any, name: str, data: Any) -> Any:
    """``model_cfg`` made class-conditional on the classes of ``data``."""
    if not is_class_conditional(model_cfg):
        able = sorted(
            e.name for _, e in MODELS.items() if issubclass(e.config, ClassConditionalConfig)
        )
        raise ValueError(
            f"--conditional: model {name} has no class-conditional form (models with one: "
            f"{', '.join(able)})"
        )
    if data.n_classes is None:
        raise ValueError(f"--conditional needs labelled data; {data.name} has no labels")
    return replace(model_cfg, n_classes=max(2, data.n_classes))


def cmd_presets(args: argparse.Namespace) -> int:
    for family, entries in families().items():
        print(f"{family}:")
        for entry in entries:
            for p in presets_of(entry.name):
                cfg = p.config
                shape = cfg.image_shape if is_image_config(cfg) else (cfg.dim,)
                count = ""
                if args.count:
                    count = f" {count_parameters(entry.build(cfg)):>12,} parameters"
                print(
                    f"  {p.name:18s} {entry.name:22s} shape={tuple(shape)!s:14s}{count}"
                    f"  {p.description}"
                )
    return 0
