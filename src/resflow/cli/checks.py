"""Argument values and sizes refused before any work: values no command can use,
outputs that could never fit in memory, and the files a command will write."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from resflow.checkpoint import CheckpointError
from resflow.data import DataConfig
from resflow.models.configs import is_vector_config
from resflow.runs import RunFolder, check_outputs

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


def check_args(args: argparse.Namespace) -> None:
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
        check_memory(f"--batch-size {args.batch_size}", args.batch_size * width,
                     "lower --batch-size")  # fmt: skip
        check_memory(f"--n-eval {args.n_eval}", args.n_eval * width, "lower --n-eval")


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


def check_memory(what: str, nbytes: float, hint: str) -> None:
    """Refuse at once an output that cannot fit in memory (instead of minutes of work
    ending in a crash)."""
    free = available_memory()
    if nbytes > free:
        raise ValueError(
            f"{what} needs about {nbytes / 2**30:,.1f} GiB of memory; "
            f"{free / 2**30:,.1f} GiB are available: {hint}"
        )


def check_toy_size(cfg: DataConfig) -> None:
    """Refuse at once toy data that cannot fit in memory (drawing them would page for
    a minute before the allocator fails)."""
    from resflow.data.toy2d import TOY_DATASETS

    if cfg.name in TOY_DATASETS:
        points = cfg.n_train + cfg.n_test + cfg.n_valid
        check_memory(f"--n-train {cfg.n_train} with --n-test {cfg.n_test}",
                     points * TOY_BYTES_PER_POINT, "lower --n-train (or --n-test)")  # fmt: skip


ACTIVATION_BYTES = 24
"""Bytes per pixel and widest hidden channel held while an image model's inverse runs
(six float32 activations; 33 bytes measured for realnvp-digits at 1024x1024: a lower
bound, for refusing sizes that can never fit)."""


def widest_channels(model: torch.nn.Module) -> int:
    """The most output channels of any convolution in ``model``, per input channel."""
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return max(convs, default=1)


def torch_device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda, cuda:1 or mps") from None


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
        if is_vector_config(model) and model.dim == 2:
            outputs.append(("--out", out.with_suffix(".png")))
    return outputs


def checking_outputs(command: Any) -> Any:
    """``command`` preceded by :func:`resflow.runs.check_outputs` on its outputs."""

    def checked(args: argparse.Namespace) -> int:
        check_outputs(_outputs(args), args.overwrite)
        return int(command(args))

    return checked
