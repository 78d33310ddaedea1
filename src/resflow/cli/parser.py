"""The ``resflow`` argument parser: the data and training flags generated from their
config dataclasses, the ``vi`` defaults read from :mod:`resflow.vi`, every command's
flags and the function that runs it."""

from __future__ import annotations

import argparse

from resflow.cli.checks import checking_outputs
from resflow.cli.draw import cmd_compress, cmd_interpolate, cmd_sample
from resflow.cli.measure import cmd_check, cmd_eval, cmd_fid, cmd_score
from resflow.cli.train import DATA_EXCLUDE, DATA_FLAGS, cmd_presets, cmd_train
from resflow.cli.vi import cmd_vi
from resflow.config import add_flags
from resflow.data import DataConfig
from resflow.models import MODELS, PRESETS, families
from resflow.train_config import TrainConfig
from resflow.version import __version__
from resflow.vi.reverse_kl import DEFAULTS as VI
from resflow.vi.targets import DEFAULT_DIM, TARGETS

DESCRIPTION = "The ``resflow`` command line: a thin layer over the library."


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 16x16, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resflow", description=DESCRIPTION)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("--version", action="version", version=f"resflow {__version__}")
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
    add_flags(t, DataConfig, exclude=DATA_EXCLUDE, rename=DATA_FLAGS)
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
    v.add_argument("--target", required=True, choices=TARGETS.names(), help="target density")
    v.add_argument("--dim", type=_positive, default=DEFAULT_DIM, help="dimension (funnel only)")
    v.add_argument("--model", default="naf", help="vector model family (default naf: IAF)")
    v.add_argument("--preset", default=None, help="a vector model preset instead of --model")
    v.add_argument("--steps", type=_positive, default=VI.steps)
    v.add_argument("--batch-size", type=_positive, default=VI.batch_size)
    v.add_argument("--lr", type=float, default=VI.lr)
    v.add_argument("--anneal", type=int, default=VI.anneal,
                   help="steps over which the target's inverse temperature rises to 1")  # fmt: skip
    v.add_argument("--n-eval", type=_positive, default=VI.n_eval, help="samples for the KL")
    v.add_argument("--seed", type=int, default=VI.seed)
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
        q.set_defaults(func=checking_outputs(q.get_default("func")))

    pr = sub.add_parser("presets", help="list model presets by family")
    pr.add_argument("--count", action="store_true", help="build each and count parameters")
    pr.set_defaults(func=cmd_presets)
    return p
