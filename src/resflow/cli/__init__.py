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
:class:`resflow.train_config.TrainConfig`, the ``vi`` defaults from
:class:`resflow.vi.ReverseKLConfig`; ``--set`` reaches any model option at any depth,
checked against its type and range before any data is loaded.

This module runs a command and turns the failures a user can cause into one line
(:func:`main`); :mod:`~resflow.cli.parser` builds the flags, :mod:`~resflow.cli.checks`
refuses values before any work, and one module per group of commands calls the library
(:mod:`~resflow.cli.train`, :mod:`~resflow.cli.measure`, :mod:`~resflow.cli.draw`,
:mod:`~resflow.cli.vi`).
"""

from __future__ import annotations

import sys

import torch

from resflow.allocator import keep_freed_memory
from resflow.checkpoint import CheckpointError
from resflow.cli.checks import check_args
from resflow.cli.parser import build_parser
from resflow.config import ConfigError
from resflow.data.download import DownloadError
from resflow.layers.residual.block import InverseNotConvergedError
from resflow.layers.transformers import BracketNotFoundError
from resflow.runs import RunExistsError, RunLockedError
from resflow.training.distributed import PeerError, peer_failure, shutdown

__all__ = ["EXPECTED", "build_parser", "main"]


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
        check_args(args)  # values every command shares, refused before any work
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
