"""The commands that draw from a run: ``sample``, ``interpolate`` and ``compress``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from resflow.cli.checks import ACTIVATION_BYTES, check_memory, widest_channels
from resflow.cli.common import refuse_conditional, run_data, run_model, sample_labels
from resflow.evaluation import decode, interpolate, save_image_grid
from resflow.latent import conceptual_compression, manifold_interpolation
from resflow.models.configs import is_image_config
from resflow.runs import RunFolder


def cmd_sample(args: argparse.Namespace) -> int:
    if args.size is not None:
        args.set = [*args.set, *_resize(args)]
    model = run_model(args)
    refuse_conditional(model, "sample")
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
    check_memory(f"--n {args.n}", args.n * per_sample, "lower --n")
    if args.size is not None:  # the network's activations at the new size, one batch
        batch = min(args.n, args.batch_size)
        check_memory(f"--size {args.size[0]}x{args.size[1]}",
                     batch * model.dim * widest_channels(model) * ACTIVATION_BYTES,
                     "sample at a smaller size (or lower --batch-size)")  # fmt: skip
    scatter = model.levels is None and model.shape == (2,)
    data = run_data(args, model) if scatter else None  # checked before any file is written
    torch.manual_seed(args.seed)
    chunks, errors = [], []
    labels = sample_labels(model, args.label, args.n)
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


def _resize(args: argparse.Namespace) -> list[str]:
    """``--set image_shape=...`` for ``--size HxW`` (fully convolutional image models)."""
    cfg = RunFolder(args.run).read_config().model
    if not is_image_config(cfg):
        raise ValueError("--size: this run models vectors, not images")
    shape = cfg.image_shape
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
    model = run_model(args)
    if model.levels is None:
        raise ValueError("interpolate writes image grids; this run models vectors")
    scale = max(1, 96 // model.shape[-1])
    n_images = args.steps**2 if args.manifold else args.pairs * args.steps
    what = f"--steps {args.steps}" + ("" if args.manifold else f" with --pairs {args.pairs}")
    check_memory(what, n_images * model.dim * (8 + 2 * scale**2), "lower --steps")
    data = run_data(args, model)
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
    model = run_model(args)
    if model.levels is None:
        raise ValueError("compress writes image grids; this run models vectors")
    data = run_data(args, model)
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
