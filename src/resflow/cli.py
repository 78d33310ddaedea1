"""The ``resflow`` command line: a thin layer over the library.

    resflow train       [--data digits] [--model NAME | --preset NAME] [--set key=value]
    resflow eval        --run DIR [--set key=value]
    resflow score       --run DIR --input PATH|DATA [--input ...] [--out scores.csv] [--plot PNG]
                        [--repeats R] [--hutchinson K]   per input: mean +- standard error
    resflow fid         --run DIR [--n 10000]  FID of samples (optional extra: resflow[fid])
    resflow sample      --run DIR [--n 64] [--temperature 1.0] [--label K] [--size HxW]
                        [--denoise] [--guidance W]
    resflow interpolate --run DIR [--steps 8] [--manifold] [--out FILE]
    resflow compress    --run DIR [--n 8]     keep the coarsest latents, resample the rest
    resflow check       --run DIR             certify Lipschitz bounds, inverses, densities
    resflow presets     [--count]

Every command maps onto a few library calls (see the README's Python examples). The
data and training flags come from :class:`resflow.data.DataConfig` and
:class:`resflow.train_config.TrainConfig`; ``--set`` reaches any model option at any
depth, checked against its type and range before any data is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from resflow.allocator import keep_freed_memory
from resflow.certify import certify
from resflow.checkpoint import CheckpointError
from resflow.config import ConfigError, add_flags, given_flags, override, parse_sets, replace
from resflow.data import DataConfig, data_kind, load_data
from resflow.data.download import DownloadError
from resflow.evaluation import (
    decode,
    evaluate,
    evaluate_bounds,
    interpolate,
    save_image_grid,
    save_temperature_grids,
)
from resflow.flow import check_finite_weights
from resflow.latent import conceptual_compression, manifold_interpolation
from resflow.layers.residual.block import InverseNotConvergedError
from resflow.layers.transformers import BracketNotFoundError
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
from resflow.preprocess.noise import GaussianNoise
from resflow.runs import RunExistsError, RunFolder, RunLockedError, check_run_record
from resflow.train_config import TrainConfig
from resflow.training import Trainer
from resflow.training.distributed import (
    PeerError,
    launched_by_torchrun,
    load_shared,
    peer_failure,
    setup,
    shutdown,
)

REDUCED_T = 0.7
"""The second panel of the sample grid that `train` writes (as in the Glow paper)."""
_DATA_FLAGS = {"name": "data"}
_DATA_EXCLUDE = ("seed",)  # the data seed is the run's --seed


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
    data_flags = given_flags(args, DataConfig, _DATA_FLAGS)
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
        if run.last.exists():
            check_run_record(run, "last")  # a record copied from another run, before any work
        recorded = run.read_config()
        if recorded.data is None:
            raise ValueError(f"--resume: {out} records no data set (trained from tensors)")
        data_cfg = replace(recorded.data, **data_flags)
        train_cfg = replace(recorded.train, **train_flags)
        model_cfg = override(recorded.model, sets)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
            if run.stopped_before_first_checkpoint():
                print(f"resflow: {out} was stopped before its first checkpoint; starting it "
                      "again from step 0 with its recorded model, data and settings")  # fmt: skip
            else:
                print(f"resflow: resuming {out} with its recorded model, data and settings")
    _check_toy_size(data_cfg)

    if launched_by_torchrun():  # one copy of the data per machine, not per process
        data = load_shared(data_cfg, setup(_torch_device(train_cfg.device)))
    else:
        data = load_data(data_cfg)
    if not resumed:
        model_cfg = override(entry.adapt(model_cfg, data.shape, data.levels), sets)
        if args.conditional:
            model_cfg = _conditional(model_cfg, entry.name, data)
    trainer = Trainer(model_cfg, data, train_cfg, out, resume=args.resume, overwrite=args.overwrite)
    if not trainer.dist.is_main:  # another rank of a torchrun launch: train and evaluate
        final = trainer.fit().final
        if final is None or final.n != len(data.test):
            trainer.evaluate()
        return 0
    if trainer.restarted and not resumed:
        print(f"resflow: {out} was stopped before its first checkpoint; starting it again "
              "with the same settings")  # fmt: skip
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
    _report_benchmark(data.name, result)
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
    elif data.shape == (2,):
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


def _check_toy_size(cfg: DataConfig) -> None:
    """Refuse at once toy data that cannot fit in memory (drawing them would page for
    a minute before the allocator fails)."""
    from resflow.data.toy2d import TOY_DATASETS

    if cfg.name in TOY_DATASETS:
        points = cfg.n_train + cfg.n_test + cfg.n_valid
        _check_memory(f"--n-train {cfg.n_train} with --n-test {cfg.n_test}",
                      points * TOY_BYTES_PER_POINT, "lower --n-train (or --n-test)")  # fmt: skip


def _torch_device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda, cuda:1 or mps") from None


def _conditional(model_cfg: Any, name: str, data: Any) -> Any:
    """``model_cfg`` made class-conditional on the classes of ``data``."""
    if not hasattr(model_cfg, "n_classes"):
        able = sorted(e.name for _, e in MODELS.items() if "n_classes" in _fields(e.config))
        raise ValueError(
            f"--conditional: model {name} has no class-conditional form (models with one: "
            f"{', '.join(able)})"
        )
    if data.n_classes is None:
        raise ValueError(f"--conditional needs labelled data; {data.name} has no labels")
    return replace(model_cfg, n_classes=max(2, data.n_classes))


def _fields(cls: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def _labels(model: Any, label: int | None, n: int) -> torch.Tensor | None:
    """Class labels for ``n`` samples: ``label`` for all, else ``0..K-1`` in turn."""
    k = model.n_classes
    if label is None:
        return None if k is None else torch.arange(n) % k
    if k is None:
        raise ValueError("--label: this model is not class-conditional (train with --conditional)")
    if not 0 <= label < k:
        raise ValueError(f"--label {label} is out of range: the model has classes 0..{k - 1}")
    return torch.full((n,), label, dtype=torch.long)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 16x16, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def _model(args: argparse.Namespace) -> Any:
    """The run's model, after the checks every command shares: the run's record describes
    its checkpoint, and (except for `check`, which reports it as a failed certificate)
    the weights are finite."""
    run = RunFolder(args.run)
    model = run.load_model(args.which, overrides=parse_sets(args.set) or None)
    check_run_record(run, args.which)
    if args.command != "check":
        check_finite_weights(model)
    return model


def _run_data(args: argparse.Namespace, model: Any) -> Any:
    """The run's recorded data, checked against the model it is used with."""
    data = RunFolder(args.run).load_data(args.data_dir)
    if tuple(data.test.shape[1:]) != tuple(model.shape) and getattr(args, "size", None) is None:
        raise ValueError(
            f"{args.run}: its data {data.name} {tuple(data.test.shape[1:])} do not fit its "
            f"model {tuple(model.shape)}; is config.yaml copied from another run?"
        )
    if data.levels != model.levels:
        raise ValueError(
            f"{args.run}: its data {data.name} have {data.levels} levels, its model "
            f"{model.levels}; is config.yaml copied from another run (or its n_bits changed)?"
        )
    return data


def cmd_eval(args: argparse.Namespace) -> int:
    model = _model(args)
    data = _run_data(args, model)
    test = data.test if args.max is None else data.test[: args.max]
    labels = None if data.test_labels is None else data.test_labels[: len(test)]
    torch.manual_seed(args.seed)
    if args.iw_samples:
        bounds = evaluate_bounds(
            model, test, args.iw_samples, args.batch_size, not args.no_progress, labels=labels
        )
        print(f"test variational bound {bounds.elbo}")
        print(f"test importance-weighted bound, K={bounds.k}: {bounds.iw}")
        return 0
    result = evaluate(model, test, args.batch_size, progress=not args.no_progress, labels=labels)
    print(f"test {result}")
    _report_benchmark(data.name, result)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Bits/dim (or NLL) of every input: folders of images, arrays, or data sets' test
    splits; each input drawn ``--repeats`` times for its standard error."""
    from resflow.evaluation import density_note
    from resflow.scoring import plot_score_histogram, score, unit_of, write_scores

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {out}: scores are written as .csv or .json")
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: the histogram is a .png")
    model = _model(args)
    inputs = [_score_input(args, model, name) for name in args.input]
    if args.repeats is not None:  # every draw of every input is kept (float64)
        n = sum(len(inp.data) for inp, _ in inputs)
        _check_memory(f"--repeats {args.repeats}", 8 * n * args.repeats, "lower --repeats")
    unit, scores, note = unit_of(model), [], density_note(model)
    for inp, labels in inputs:
        torch.manual_seed(args.seed)  # each input scored as `resflow eval` would score it
        sc = score(model, inp.data, args.batch_size, not args.no_progress, labels,
                   repeats=args.repeats, hutchinson=args.hutchinson)  # fmt: skip
        scores.append(sc)
        print(f"{inp.source}: {sc.summary(unit, note)}")
    write_scores(out, [i for i, _ in inputs], scores, unit)
    print(f"scores: {out}")
    if args.plot is not None:
        groups = {i.source: sc.values for (i, _), sc in zip(inputs, scores)}
        plot_score_histogram(groups, args.plot, unit, title=f"{unit} under {args.run}")
        print(f"histogram: {args.plot}")
    return 0


def _score_input(args: argparse.Namespace, model: Any, name: str) -> tuple[Any, Any]:
    """``(ScoreInput, labels or None)`` for a path, or a data set's test split (read with
    the run's data settings: bit depth, size)."""
    from resflow.scoring import ScoreInput, load_inputs

    if Path(name).exists() or Path(name).suffix:
        inp, labels = load_inputs(name, model), None
    else:
        try:
            data_kind(name)
        except ValueError:
            raise ValueError(f"--input {name}: no such file or folder, nor a data set") from None
        recorded = RunFolder(args.run).read_config().data
        cfg = DataConfig(name=name) if recorded is None else replace(recorded, name=name)
        if args.data_dir is not None:
            cfg = replace(cfg, data_dir=args.data_dir)
        data = load_data(cfg)
        if tuple(data.test.shape[1:]) != model.shape or data.levels != model.levels:
            raise ValueError(f"--input {name}: its test images {tuple(data.test.shape[1:])} with "
                             f"{data.levels} levels do not fit the model's {model.shape} with "
                             f"{model.levels}")  # fmt: skip
        test, labels = data.test, data.test_labels
        inp = ScoreInput(f"{name} (test)", [str(i) for i in range(len(test))], test)
    if args.max is not None:
        inp = ScoreInput(inp.source, inp.names[: args.max], inp.data[: args.max])
    keep = model.n_classes is not None or callable(getattr(model, "log_prob_and_logits", None))
    if labels is not None and keep:
        return inp, labels[: len(inp.data)]
    return inp, None


def cmd_fid(args: argparse.Namespace) -> int:
    """FID of the run's samples against its data (the optional ``fid`` extra)."""
    from resflow.fid import fid, inception_network

    model = _model(args)
    if model.levels is None:
        raise ValueError("fid compares images; this run models vectors")
    _check_memory(f"--n {args.n}", args.n * model.dim * 8, "lower --n")
    net = inception_network(args.device)  # a clear error before any sampling
    data = _run_data(args, model)
    reference = data.train if args.reference == "train" else data.test
    torch.manual_seed(args.seed)
    labels = _labels(model, None, args.n)
    chunks = []
    from tqdm.auto import tqdm

    starts = range(0, args.n, args.batch_size)  # a bar with its estimate of the time left
    for start in tqdm(starts, desc="sample", unit="batch", leave=False,
                      disable=args.no_progress or len(starts) < 2):  # fmt: skip
        m = min(args.batch_size, args.n - start)
        y = None if labels is None else labels[start : start + m]
        chunks.append(model.sample(m, args.temperature, y))
    samples = torch.cat(chunks)
    value = fid(samples, reference[: args.n_reference], model.levels, net=net)
    print(f"FID {value:.2f} ({args.n} samples at temperature {args.temperature} against "
          f"{min(args.n_reference, len(reference))} {args.reference} images)")  # fmt: skip
    return 0


def _report_benchmark(name: str, result: Any) -> None:
    """The tabular benchmarks are reported as log-likelihoods: print it beside the paper's."""
    from resflow.data.tabular_benchmarks import REFERENCE_LOG_LIKELIHOOD

    if name in REFERENCE_LOG_LIKELIHOOD:
        print(
            f"test log-likelihood {-result.mean:.4f} +- {result.stderr:.4f} nats "
            f"(NAF-DDSF(5) in its paper: {REFERENCE_LOG_LIKELIHOOD[name]})"
        )


def cmd_sample(args: argparse.Namespace) -> int:
    if args.size is not None:
        args.set = [*args.set, *_resize(args)]
    model = _model(args)
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    out = Path(args.out)
    suffix = out.suffix.lower()
    if model.levels is not None and suffix != ".png":
        raise ValueError(f"--out {out}: an image run writes a .png grid")
    if model.levels is None and suffix not in (".npy", ".csv", ".png"):
        raise ValueError(f"--out {out}: a vector run writes .npy, .csv or (2-D) .png")
    if model.levels is None and suffix == ".png" and model.shape != (2,):
        raise ValueError(f"--out {out}: a PNG of samples needs 2-D data; use .npy or .csv")
    if model.levels is not None:  # the samples, and the grid at its scale
        per_sample = model.dim * (4 + 2 * max(1, 128 // model.shape[-1]) ** 2)
    else:  # the samples, their float64 copy and (.csv) their text
        per_sample = model.dim * (4 + 8 + (16 if suffix == ".csv" else 0))
    _check_memory(f"--n {args.n}", args.n * per_sample, "lower --n")
    if args.size is not None:  # the network's activations at the new size, one batch
        batch = min(args.n, args.batch_size)
        _check_memory(f"--size {args.size[0]}x{args.size[1]}",
                      batch * model.dim * _widest_channels(model) * ACTIVATION_BYTES,
                      "sample at a smaller size (or lower --batch-size)")  # fmt: skip
    scatter = model.levels is None and model.shape == (2,)
    data = _run_data(args, model) if scatter else None  # checked before any file is written
    torch.manual_seed(args.seed)
    chunks, errors = [], []
    labels = _labels(model, args.label, args.n)
    from tqdm.auto import tqdm

    starts = range(0, args.n, args.batch_size)  # a bar with its estimate of the time left
    for start in tqdm(starts, desc="sample", unit="batch", leave=False,
                      disable=args.no_progress or len(starts) < 2):  # fmt: skip
        m = min(args.batch_size, args.n - start)
        y = None if labels is None else labels[start : start + m]
        z = model.sample_latent(m, args.temperature, y)
        chunks.append(decode(model, z, y, args.denoise, args.guidance))
        if args.check:
            errors.append(model.round_trip_error(z, y))
    samples = torch.cat(chunks)
    if model.levels is not None:
        scale = max(1, 128 // model.shape[-1])
        save_image_grid(samples, out, model.levels, scale=scale)
    else:
        _write_array(samples, out)
        if scatter:
            from resflow.plots import plot_samples_2d

            assert data is not None
            png = out if suffix == ".png" else out.with_suffix(".png")
            plot_samples_2d(samples, data.test, png)
            print(f"scatter of the samples beside the test data: {png}")
    what = "" if args.label is None else f" of class {args.label}"
    what += "" if args.guidance is None else f" with guidance {args.guidance:g}"
    what += ", denoised" if args.denoise else ""
    size = "x".join(map(str, model.shape))
    print(f"wrote {len(samples)} samples{what} ({size}) at temperature {args.temperature} to {out}")
    if args.check:
        worst = float(torch.cat(errors).max())
        print(f"worst round-trip error {model.round_trip_formula()} of these samples: {worst:.3g}")
    return 0


ACTIVATION_BYTES = 24
"""Bytes per pixel and widest hidden channel held while an image model's inverse runs
(six float32 activations; 33 bytes measured for realnvp-digits at 1024x1024: a lower
bound, for refusing sizes that can never fit)."""


def _widest_channels(model: torch.nn.Module) -> int:
    """The most output channels of any convolution in ``model``, per input channel."""
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return max(convs, default=1)


def _resize(args: argparse.Namespace) -> list[str]:
    """``--set image_shape=...`` for ``--size HxW`` (fully convolutional image models)."""
    cfg = RunFolder(args.run).read_config().model
    shape = getattr(cfg, "image_shape", None)
    if shape is None:
        raise ValueError("--size: this run models vectors, not images")
    h, w = args.size
    return [f"image_shape=[{shape[0]},{h},{w}]"]


def _write_array(samples: torch.Tensor, out: Path) -> None:
    import io

    import numpy as np

    from resflow.io import atomic_write

    arr = samples.detach().double().cpu().numpy()
    if out.suffix.lower() == ".npy":
        atomic_write(out, lambda f: np.save(f, arr))
    elif out.suffix.lower() == ".csv":
        buf = io.StringIO()
        np.savetxt(buf, arr, delimiter=",", fmt="%.8g")
        atomic_write(out, lambda f: f.write(buf.getvalue().encode()))


def cmd_interpolate(args: argparse.Namespace) -> int:
    model = _model(args)
    if model.levels is None:
        raise ValueError("interpolate writes image grids; this run models vectors")
    scale = max(1, 96 // model.shape[-1])
    n_images = args.steps**2 if args.manifold else args.pairs * args.steps
    what = f"--steps {args.steps}" + ("" if args.manifold else f" with --pairs {args.pairs}")
    _check_memory(what, n_images * model.dim * (8 + 2 * scale**2), "lower --steps")
    data = _run_data(args, model)
    torch.manual_seed(args.seed)
    if args.manifold:
        if len(data.test) < 4:
            raise ValueError("--manifold needs 4 test images")
        idx = torch.randperm(len(data.test))[:4]
        label = None
        if model.n_classes is not None:
            assert data.test_labels is not None
            label = data.test_labels[idx[:1]]
        grid = manifold_interpolation(model, data.test[idx], args.steps, label)
        out = save_image_grid(grid, args.out, model.levels, nrow=args.steps, scale=scale)
        print(f"wrote the {args.steps}x{args.steps} manifold of 4 test images to {out}")
        return 0
    if model.n_classes is not None:
        raise ValueError("interpolate: use --manifold for a class-conditional model")
    if 2 * args.pairs > len(data.test):
        raise ValueError(
            f"--pairs {args.pairs} needs {2 * args.pairs} test images; there are {len(data.test)}"
        )
    idx = torch.randperm(len(data.test))[: 2 * args.pairs]
    rows = [
        interpolate(model, data.test[i], data.test[j], args.steps)
        for i, j in idx.view(-1, 2).tolist()
    ]
    out = save_image_grid(torch.cat(rows), args.out, model.levels, nrow=args.steps, scale=scale)
    print(f"wrote {args.pairs} interpolation(s) of {args.steps} steps to {out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    model = _model(args)
    if model.levels is None:
        raise ValueError("compress writes image grids; this run models vectors")
    data = _run_data(args, model)
    if args.n > len(data.test):
        raise ValueError(f"--n {args.n}: there are {len(data.test)} test images")
    torch.manual_seed(args.seed)
    idx = torch.randperm(len(data.test))[: args.n]
    labels = None
    if model.n_classes is not None:
        assert data.test_labels is not None
        labels = data.test_labels[idx]
    grid, kept = conceptual_compression(model, data.test[idx], args.temperature, labels)
    ncol = len(kept) + 1
    originals = data.test[idx].to(grid.dtype).unsqueeze(1)
    rows = torch.cat([originals, grid.view(args.n, len(kept), *model.shape)], 1)
    scale = max(1, 96 // model.shape[-1])
    out = save_image_grid(rows.flatten(0, 1), args.out, model.levels, nrow=ncol, scale=scale)
    shares = ", ".join(f"{100 * k:g}%" for k in kept)
    print(f"wrote {args.n} image(s), then decoded keeping {shares} of the latents, to {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    model = _model(args)
    data = _run_data(args, model)
    cert = certify(model, data.test, args.n, data.test_labels)
    for line in cert.lines():
        print(line)
    return 0 if cert.passed else 1


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
    check_output(out, "--out", args.overwrite, what="folder")  # before any training
    earlier = [out / name for name in ("result.json", "fit.png") if (out / name).exists()]
    if earlier and not args.overwrite:
        raise ValueError(
            f"--out {out} already holds a fit ({earlier[0].name}); pass --overwrite to "
            "replace it (or choose another --out)"
        )
    torch.manual_seed(args.seed)
    q = sampling_direction(entry.build(cfg))
    print(f"resflow: fitting {entry.name} ({count_parameters(q):,} parameters) to "
          f"{target.name} ({target.dim}-D) by reverse KL for {args.steps} steps")  # fmt: skip
    history = fit_reverse_kl(q, target, args.steps, args.batch_size, args.lr,
                             progress=not args.no_progress, seed=args.seed,
                             anneal=args.anneal, beta0=0.05)  # fmt: skip
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


def check_output(path: Path, flag: str, overwrite: bool, what: str = "file") -> None:
    """Refuse, before any work, an output location that cannot be written or that holds
    an earlier result (unless ``--overwrite``)."""
    if what == "file" and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if what == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"{flag} {path}: {parent} is not writable")
            break
    if what == "file" and path.exists() and not overwrite:
        raise ValueError(
            f"{flag} {path} already exists; pass --overwrite to replace it (or choose "
            f"another {flag})"
        )


def _outputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The files a command (sample, score, interpolate, compress) will write."""
    out = Path(args.out)
    outputs = [("--out", out)]
    if args.command == "score" and args.plot is not None:
        outputs.append(("--plot", Path(args.plot)))
    if args.command == "sample" and out.suffix.lower() in (".npy", ".csv"):
        try:  # a 2-D vector run also writes a scatter .png beside the samples
            model = RunFolder(args.run).read_config().model
        except CheckpointError:
            model = None  # the command says what is wrong with the run
        if getattr(model, "dim", None) == 2 and getattr(model, "image_shape", None) is None:
            outputs.append(("--out", out.with_suffix(".png")))
    return outputs


def _checking_outputs(command: Any) -> Any:
    """``command`` preceded by :func:`check_output` on each of its outputs."""

    def checked(args: argparse.Namespace) -> int:
        outputs = _outputs(args)
        for flag, path in outputs:
            check_output(path, flag, args.overwrite)
        if len({p.resolve() for _, p in outputs}) < len(outputs):
            flags = " and ".join(dict.fromkeys(f for f, _ in outputs))
            names = ", ".join(str(p) for _, p in outputs)
            raise ValueError(f"{flags} name the same file ({names}); give each its own")
        return int(command(args))

    return checked


def cmd_presets(args: argparse.Namespace) -> int:
    for family, entries in families().items():
        print(f"{family}:")
        for entry in entries:
            for p in presets_of(entry.name):
                cfg = p.config
                shape = getattr(cfg, "image_shape", None) or (getattr(cfg, "dim", "?"),)
                count = ""
                if args.count:
                    count = f" {count_parameters(entry.build(cfg)):>12,} parameters"
                print(
                    f"  {p.name:18s} {entry.name:22s} shape={tuple(shape)!s:14s}{count}"
                    f"  {p.description}"
                )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resflow", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a flow (default: a Residual Flow on the embedded 8x8 digits)",
    )
    t.add_argument(
        "--model",
        default=None,
        help=f"model or family: {', '.join(sorted(set(families()) | set(MODELS)))}",
    )
    t.add_argument("--preset", default=None, help=f"model preset: {', '.join(PRESETS)}")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model option at any depth, e.g. --set n_blocks=[2,2] "
        "--set estimator.dist=geometric",
    )
    t.add_argument("--out", default=None, help="run folder (default runs/<data>-<preset>)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in <out>")
    t.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="of samples.png, shown beside T = 0.7 (default: 1.0)",
    )
    t.add_argument(
        "--conditional",
        action="store_true",
        help="a class-conditional model of the data's labels (realnvp, glow, residual-flow)",
    )
    t.add_argument(
        "--dequantization",
        choices=("uniform", "variational"),
        default=None,
        help="of an image model: uniform noise or Flow++'s learned q(u|x) "
        "(= --set dequantization.kind=...; default: the preset's)",
    )
    add_flags(t, DataConfig, exclude=_DATA_EXCLUDE, rename=_DATA_FLAGS)
    add_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="test bits/dim (or NLL) of a run, mean +- standard error")
    e.add_argument("--max", type=_positive, default=None, help="evaluate the first N test examples")
    e.add_argument("--batch-size", type=_positive, default=256)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument(
        "--iw-samples",
        type=_positive,
        default=None,
        metavar="K",
        help="report the variational and the importance-weighted bound with K noise "
        "draws per example (dequantized models)",
    )
    e.set_defaults(func=cmd_eval)

    sc = sub.add_parser(
        "score",
        help="bits/dim (or NLL) per input of image folders, arrays or data sets, as CSV/JSON "
        "(out-of-distribution scoring), with a histogram comparing them",
    )
    sc.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH|DATA",
        help="a folder of images, an .npy array (images in 0..levels-1, or vectors), a .csv "
        "matrix, or a data set name (its test split); repeat to compare several",
    )
    sc.add_argument("--out", default="scores.csv", help="scores file: .csv or .json")
    sc.add_argument("--plot", default=None, metavar="PNG", help="histogram of the scores")
    sc.add_argument("--max", type=_positive, default=None, help="score the first N of each input")
    sc.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        metavar="R",
        help="independent draws per input (noise, Hutchinson vectors); its score is their "
        "mean, with a standard error from them (default: 4 for a stochastic model, 1 else)",
    )
    sc.add_argument(
        "--hutchinson",
        type=_positive,
        default=None,
        metavar="K",
        help="Hutchinson vectors per input in every residual block's logdet (default: the "
        "model's, 1); more give a smaller standard error",
    )
    sc.add_argument("--batch-size", type=_positive, default=256)
    sc.add_argument("--no-progress", action="store_true")
    sc.set_defaults(func=cmd_score)

    fd = sub.add_parser(
        "fid",
        help="Frechet Inception Distance of samples to the data (needs the fid extra: "
        "pip install 'resflow[fid]')",
    )
    fd.add_argument("--n", type=_positive, default=10_000, help="samples")
    fd.add_argument("--n-reference", type=_positive, default=50_000, help="data images")
    fd.add_argument("--reference", choices=("train", "test"), default="train")
    fd.add_argument("--temperature", type=float, default=1.0)
    fd.add_argument("--batch-size", type=_positive, default=256, help="samples per inverse pass")
    fd.add_argument(
        "--device", default=None, help="of the Inception network (default: cuda if any)"
    )
    fd.set_defaults(func=cmd_fid)

    s = sub.add_parser(
        "sample", help="write samples: a PNG grid (images), .npy/.csv and a 2-D scatter PNG"
    )
    s.add_argument("--n", type=_positive, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--batch-size", type=_positive, default=1024, help="samples per inverse pass")
    s.add_argument("--out", default="samples.png", help="file; its suffix picks the format")
    s.add_argument(
        "--check", action="store_true", help="report the worst round-trip error of the samples"
    )
    s.add_argument(
        "--label", type=int, default=None, help="class of every sample (class-conditional runs)"
    )
    s.add_argument(
        "--denoise",
        action="store_true",
        help="one-step denoising with the model's score (models trained with noise_std > 0)",
    )
    s.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="W",
        help="classifier-free guidance weight (TarFlow; 1: conditional, 0: unconditional)",
    )
    s.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="HxW",
        help="sample at another resolution (fully convolutional models, e.g. RealNVP)",
    )
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("interpolate", help="decode straight lines between test images' latents")
    i.add_argument("--pairs", type=_positive, default=4)
    i.add_argument("--steps", type=_positive, default=8)
    i.add_argument(
        "--manifold",
        action="store_true",
        help="the steps x steps manifold spanned by 4 test images (RealNVP, §5)",
    )
    i.add_argument("--out", default="interpolation.png")
    i.set_defaults(func=cmd_interpolate)

    k = sub.add_parser(
        "compress",
        help="conceptual compression: decode test images from their coarsest latents only",
    )
    k.add_argument("--n", type=_positive, default=8, help="test images (rows)")
    k.add_argument("--temperature", type=float, default=1.0, help="of the resampled latents")
    k.add_argument("--out", default="compression.png")
    k.set_defaults(func=cmd_compress)

    c = sub.add_parser(
        "check",
        help="certify a trained model: Lipschitz bounds, inverse errors, log-density gap "
        "(exit code 1 if any check fails)",
    )
    c.add_argument("--n", type=_positive, default=256, help="test examples to check")
    c.set_defaults(func=cmd_check)

    for q in (e, sc, fd, s, i, k, c):
        q.add_argument("--run", required=True, help="run folder written by `resflow train`")
        q.add_argument("--which", default="best", help="best or last checkpoint")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a model option that keeps the weights, e.g. "
            "--set estimator.eval_dist=poisson",
        )
    for q in (t, e, sc, fd, s, i, k, c):
        q.add_argument(
            "--threads",
            type=_positive,
            default=None,
            help="torch intra-op threads (default: torch's, one per core; on a shared "
            "machine fewer can be faster)",
        )
    for q in (e, sc, fd, s, i, k, c):
        q.add_argument("--data-dir", default=None, help="folder with the data sets")

    v = sub.add_parser("vi", help="fit a flow to an unnormalized 2-D / n-D target by reverse KL")
    from resflow.vi.targets import TARGETS

    v.add_argument("--target", required=True, choices=TARGETS.names(), help="target density")
    v.add_argument("--dim", type=_positive, default=2, help="dimension (funnel only)")
    v.add_argument("--model", default="naf", help="vector model family (default naf: IAF)")
    v.add_argument("--preset", default=None, help="a vector model preset instead of --model")
    v.add_argument("--steps", type=_positive, default=2000)
    v.add_argument("--batch-size", type=_positive, default=256)
    v.add_argument("--lr", type=float, default=3e-3)
    v.add_argument("--anneal", type=int, default=0,
                   help="steps over which the target's inverse temperature rises to 1")  # fmt: skip
    v.add_argument("--n-eval", type=_positive, default=10_000, help="samples for the KL")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None, help="folder for fit.png and result.json")
    v.add_argument("--no-progress", action="store_true")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model option")  # fmt: skip
    v.add_argument("--threads", type=_positive, default=None, help="torch intra-op threads")
    v.set_defaults(func=cmd_vi)

    for q in (sc, s, i, k, v):  # the commands that write files: nothing replaced unasked
        q.add_argument(
            "--overwrite", action="store_true", help="replace the output files if they exist"
        )
    for q in (sc, s, i, k):
        q.set_defaults(func=_checking_outputs(q.get_default("func")))

    pr = sub.add_parser("presets", help="list model presets by family")
    pr.add_argument("--count", action="store_true", help="build each and count parameters")
    pr.set_defaults(func=cmd_presets)
    return p


EXPECTED = (
    ConfigError,
    ValueError,
    OSError,
    CheckpointError,
    InverseNotConvergedError,
    BracketNotFoundError,
    FloatingPointError,
    RunExistsError,
    RunLockedError,
    DownloadError,
    PeerError,  # another process of a torchrun launch failed
    ImportError,  # an optional package a data set needs (the message says which)
    MemoryError,
    torch.OutOfMemoryError,
)
"""Failures a user can cause or meet: one line and exit code 2, no traceback."""


MAX_THREADS_PER_CORE = 4
"""``--threads`` beyond this many per core is refused (far more threads than cores only
slow a run down, and torch's thread pool crashes at some tens of thousands)."""


MAX_DRAWS = 10_000
"""The most draws per input (``score --repeats / --hutchinson``, ``eval --iw-samples``):
each is a pass of the model over every input, so far more could never finish."""
VI_BYTES_PER_VALUE = 8
"""Memory per value of the samples of a reverse-KL fit, as a multiple of float64: the
samples, their log-densities and the flow's activations (a lower bound, for refusing
sizes that can never fit)."""


TOY_BYTES_PER_POINT = 48
"""Peak memory of drawing one point of a toy 2-D density (measured 57 to 97 bytes for
the samplers' intermediates; this lower bound refuses only sizes that can never fit)."""


def _check_args(args: argparse.Namespace) -> None:
    """The options whose values no command can use, refused in one line before any work."""
    import math

    temperature = getattr(args, "temperature", None)
    if temperature is not None and not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be >= 0 and finite, got {temperature}")
    guidance = getattr(args, "guidance", None)
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"--guidance must be finite, got {guidance}")
    threads = getattr(args, "threads", None)
    cores = usable_cores()
    if threads is not None and threads > MAX_THREADS_PER_CORE * cores:
        raise ValueError(
            f"--threads {threads}: this machine has {cores} core(s); use at most "
            f"{MAX_THREADS_PER_CORE * cores} (one per core is usually fastest)"
        )
    for flag in ("repeats", "hutchinson", "iw_samples"):
        value = getattr(args, flag, None)
        if value is not None and value > MAX_DRAWS:
            raise ValueError(
                f"--{flag.replace('_', '-')} {value}: at most {MAX_DRAWS:,} (each draw is "
                "another pass over every input; the standard error falls only as 1/sqrt(K))"
            )
    if args.command == "interpolate" and args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (the two ends), got {args.steps}")
    if args.command == "vi":  # samples of the target's dimension (at least 2), float64
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
        if args.anneal < 0:
            raise ValueError(f"--anneal must be >= 0, got {args.anneal}")
        width = 8 * max(2, args.dim) * VI_BYTES_PER_VALUE
        _check_memory(f"--batch-size {args.batch_size}", args.batch_size * width,
                      "lower --batch-size")  # fmt: skip
        _check_memory(f"--n-eval {args.n_eval}", args.n_eval * width, "lower --n-eval")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and
    ``taskset`` narrow), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes of memory this process may still use (MemAvailable, or the physical
    memory where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_memory(what: str, nbytes: float, hint: str) -> None:
    """Refuse at once an output that cannot fit in memory (instead of minutes of work
    ending in a crash)."""
    free = available_memory()
    if nbytes > free:
        raise ValueError(
            f"{what} needs about {nbytes / 2**30:,.1f} GiB of memory; "
            f"{free / 2**30:,.1f} GiB are available: {hint}"
        )


def _allocation_failure(e: RuntimeError) -> str | None:
    """The one line for torch's CPU allocator refusing a size (a RuntimeError, not a
    MemoryError), or ``None`` for any other error."""
    import re

    found = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(e))
    if found is None:
        return None
    gib = int(found.group(1)) / 2**30
    return (f"out of memory: an allocation of {gib:,.1f} GiB failed; lower the sizes given "
            "(--batch-size, --n, --n-train, --iw-samples, ...)")  # fmt: skip


def _message(e: BaseException) -> str:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return "out of memory; lower --batch-size (or --eval-batch-size)"
    if isinstance(e, OSError) and e.strerror and not isinstance(e, FileNotFoundError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # large tensors reused, not faulted in anew (resflow.allocator)
    ended = False
    try:
        _check_args(args)  # values every command shares, refused before any work
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        code = int(args.func(args))
        ended = True
        return code
    except EXPECTED as e:
        if args.debug:
            raise
        print(f"resflow {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a collective of a torchrun launch whose peer stopped
        peer = peer_failure(e) or _allocation_failure(e)
        if peer is None or args.debug:
            raise
        print(f"resflow {args.command}: error: {peer}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            print("\ninterrupted; resume with --resume (from last.pt, or from step 0 if no "
                  "checkpoint was written yet)", file=sys.stderr)  # fmt: skip
        else:
            print("\ninterrupted; no file is left half-written", file=sys.stderr)
        return 130
    finally:
        shutdown(together=ended)  # the process group of a torchrun launch, if any


if __name__ == "__main__":
    sys.exit(main())
