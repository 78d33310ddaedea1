"""Likelihood scoring of new inputs: bits/dim (or NLL) per input, written as CSV or JSON,
and a histogram comparing data sets -- the out-of-distribution use of density models.

``resflow score`` is a thin layer over these functions::

    model = RunFolder("runs/mnist").load_model()
    inputs = load_inputs("my_images/", model)         # a folder, .npy or .csv
    scores = score(model, inputs.data)                # bits/dim per input, in order
    scores.values, scores.stderr                      # mean and standard error per input
    write_scores("scores.csv", [inputs], [scores], unit_of(model))

**Standard errors.** The score of a stochastic model is a random estimate: fresh
dequantization noise per evaluation and, for residual flows, Hutchinson vectors and a
roulette-drawn number of series terms in each block's log-determinant. Each input is
therefore scored ``repeats`` times with independent draws (default
:data:`DEFAULT_REPEATS` for a stochastic model, 1 for a deterministic one, see
:func:`resflow.evaluation.is_stochastic`): its value is the mean of the draws and its
standard error their standard deviation over ``sqrt(repeats)``. A file's figure is the
mean over its inputs, with the standard error across inputs (which holds the
estimator's noise too) and, beside it, the part due to the estimator alone
(``sqrt(sum se_i^2) / N``). ``hutchinson=K`` spends ``K`` Hutchinson vectors per block
and example (:func:`resflow.evaluation.hutchinson_vectors`) for a smaller estimator
noise.

With ``repeats=1`` the numbers are exactly those :func:`resflow.evaluate` averages (the
same code, :func:`resflow.evaluation.per_example`): with the same seed and batch size,
``resflow score --repeats 1`` and ``resflow eval`` report the same bits/dim for the same
inputs.

Image inputs are 8-bit files (PNG, JPEG, ...); they are brought to the model's
quantization levels ``L`` as the data loaders do: ``x >> (8 - b)`` when ``L = 2**b``
(bit reduction, Glow), else ``round(x (L - 1) / 255)`` (e.g. the 17-level digits).
Arrays (``.npy``) hold images already in ``0 .. L-1`` (``[N, H, W]``, ``[N, C, H, W]``
or ``[N, H, W, C]``), or float vectors ``[N, D]`` for a vector model (also ``.csv``,
with or without a header row of column names).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from resflow.data.formats.image_files import IMAGE_EXTENSIONS
from resflow.data.formats.image_files import list_image_files as _list_images
from resflow.data.formats.image_files import read_image_files as _read_image_files
from resflow.evaluation import (
    EvalResult,
    hutchinson_vectors,
    is_stochastic,
    per_example_draws,
)
from resflow.flow import Flow
from resflow.io import atomic_write_text
from resflow.preprocess.bits import reduce_bits


@dataclass
class ScoreInput:
    """Inputs to score: ``data`` (as the model takes it) and a name per input (the
    file's path relative to the folder, or the row index of an array); ``columns``: the
    header of a CSV file, if it had one."""

    source: str
    names: list[str]
    data: Tensor
    columns: list[str] | None = None


DEFAULT_REPEATS = 4
"""Independent draws per input of a stochastic model's score, by default."""


@dataclass
class Scores:
    """The scores of one set of inputs: ``draws[i, r]`` is the ``r``-th independent draw
    of input ``i``'s bits/dim (or NLL in nats), ``float64 [N, R]``; ``exact``: the model
    is deterministic (a single draw is the value, its standard error 0);
    ``hutchinson``: the Hutchinson vectors per residual block and example, if set for
    this scoring (``None``: the model's own)."""

    draws: Tensor
    exact: bool = False
    hutchinson: int | None = None

    @property
    def repeats(self) -> int:
        return int(self.draws.shape[1])

    @property
    def values(self) -> Tensor:
        """Per input, the mean of its draws, ``[N]``."""
        return self.draws.mean(1)

    @property
    def stderr(self) -> Tensor:
        """Per input, the standard error of :attr:`values` over the draws, ``[N]`` (0 for
        an exact model; NaN, unknown, for a stochastic one drawn once)."""
        n = len(self.draws)
        if self.exact:
            return self.draws.new_zeros(n)
        if self.repeats < 2:
            return self.draws.new_full((n,), math.nan)
        return self.draws.std(1) / math.sqrt(self.repeats)

    def noise_stderr(self) -> float:
        """The standard error of the mean over the inputs due to the estimator alone,
        ``sqrt(sum_i se_i^2) / N`` (the inputs held fixed)."""
        return float(self.stderr.pow(2).sum().sqrt() / len(self.draws))

    def summary(self, unit: str, note: str = "") -> EvalResult:
        """Mean over the inputs +- its standard error across inputs (which includes the
        estimator's noise), with the draws and the estimator's own part in the note."""
        v, n = self.values, len(self.draws)
        stderr = float(v.std() / math.sqrt(n)) if n > 1 else math.nan
        if self.exact:
            how = "exact"
        elif self.repeats < 2:
            how = "1 draw per input (its estimator noise is not measured: use --repeats 2+)"
        else:
            how = (f"{self.repeats} draws per input; estimator noise +- "
                   f"{self.noise_stderr():.4f}")  # fmt: skip
        if self.hutchinson is not None:
            how += f", {self.hutchinson} Hutchinson vectors"
        return EvalResult(float(v.mean()), stderr, n, unit, "; ".join(filter(None, [how, note])))


def unit_of(model: Flow) -> str:
    """``"bits/dim"`` for discrete data, ``"nats"`` (negative log-likelihood) otherwise."""
    return "bits/dim" if model.levels is not None else "nats"


def default_repeats(model: Flow) -> int:
    """:data:`DEFAULT_REPEATS` for a stochastic model, 1 for a deterministic one."""
    return DEFAULT_REPEATS if is_stochastic(model) else 1


def score(
    model: Flow,
    data: Tensor,
    batch_size: int = 256,
    progress: bool = False,
    labels: Tensor | None = None,
    repeats: int | None = None,
    hutchinson: int | None = None,
) -> Scores:
    """Bits/dim (or NLL in nats) of every input, in order, each drawn ``repeats`` times
    (default :func:`default_repeats`) by :func:`resflow.evaluation.per_example_draws`;
    ``hutchinson``: Hutchinson vectors per residual block and example for this scoring
    (default: the model's own); ``labels``: class-conditional models."""
    repeats = default_repeats(model) if repeats is None else repeats
    more = hutchinson_vectors(model, hutchinson) if hutchinson is not None else nullcontext()
    with more:
        draws = per_example_draws(model, data, repeats, batch_size, progress, labels=labels)
    return Scores(draws, exact=not is_stochastic(model), hutchinson=hutchinson)


def to_levels(images: Tensor, levels: int) -> Tensor:
    """8-bit images in ``0..255`` brought to ``levels`` quantization levels."""
    if levels == 256:
        return images
    bits = int(round(math.log2(levels)))
    if 2**bits == levels and 1 <= bits < 8:
        return reduce_bits(images, bits)
    return torch.round(images.double() * (levels - 1) / 255).to(torch.uint8)


def load_inputs(path: str | Path, model: Flow) -> ScoreInput:
    """The inputs in ``path`` (a folder of images, an ``.npy`` array, a ``.csv`` matrix)
    checked against the model's data shape and levels (one clear error otherwise)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        data, names = _folder(path, model)
    elif path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a NumPy array file of numbers ({e})") from e
        data = _array(arr, model, path)
        names = [str(i) for i in range(len(data))]
    elif path.suffix.lower() in (".csv", ".txt"):
        if model.levels is not None:
            raise ValueError(f"{path}: an image model scores a folder of images or an .npy array")
        arr, columns = read_csv(path)
        data = _array(arr, model, path)
        names = [str(i) for i in range(len(data))]
    else:
        raise ValueError(f"{path}: expected a folder of images, an .npy array or a .csv file")
    if len(data) == 0:
        raise ValueError(f"{path}: no inputs to score")
    return ScoreInput(str(path), names, data, columns if path.suffix.lower() == ".csv" else None)


def read_csv(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """``(rows [N, D] of numbers, column names or None)`` of a comma-separated file: a
    first row that is not all numbers is its header (names, quotes removed); the rows
    are numbered from 0 after it."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    fields = [c.strip().strip('"').strip() for c in (lines[0] if lines else "").split(",")]
    columns = None if all(_is_number(c) for c in fields) else fields
    rows = lines if columns is None else lines[1:]
    if not any(r.strip() for r in rows):
        raise ValueError(f"{path}: no inputs to score")
    try:
        arr = np.loadtxt(rows, delimiter=",", ndmin=2)
    except ValueError as e:
        reason = str(e).split(";")[0]
        raise ValueError(f"{path}: not a matrix of numbers ({reason})") from e
    if columns is not None and arr.size and arr.shape[1] != len(columns):
        raise ValueError(f"{path}: the header names {len(columns)} columns, the rows have "
                         f"{arr.shape[1]}")  # fmt: skip
    return arr, columns


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _folder(folder: Path, model: Flow) -> tuple[Tensor, list[str]]:
    if model.levels is None or len(model.shape) != 3:
        raise ValueError(f"{folder}: a folder of images needs an image model; this one models "
                         f"vectors of shape {model.shape}")  # fmt: skip
    files = _list_images(folder)
    if not files:
        raise FileNotFoundError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found below {folder}"
        )
    c, h, w = model.shape
    if c not in (1, 3):
        raise ValueError(f"the model takes {c}-channel images; files have 1 or 3 channels")
    images = torch.from_numpy(_read_image_files(files, "L" if c == 1 else "RGB", None))
    if tuple(images.shape[2:]) != (h, w):
        size = "x".join(map(str, images.shape[2:]))
        raise ValueError(f"{folder}: the images are {size}; the model takes {h}x{w} images")
    names = [str(f.relative_to(folder)) for f in files]
    return to_levels(images, model.levels), names


def _array(arr: np.ndarray, model: Flow, path: Path) -> Tensor:
    shape = model.shape
    if model.levels is None:  # vectors
        if arr.ndim != 2 or arr.shape[1:] != shape or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{path}: expected numbers of shape [N, {shape[0]}], "
                             f"got {arr.dtype} {list(arr.shape)}")  # fmt: skip
        if np.iscomplexobj(arr) or arr.dtype == np.bool_:
            raise ValueError(f"{path}: expected real numbers, got {arr.dtype}")
        values = arr.astype(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{path}: {int(bad.sum())} value(s) are NaN or infinite (first in "
                             f"row {row}); a density is scored at finite points")  # fmt: skip
        return torch.from_numpy(values).to(model.dtype)
    c, h, w = shape
    if arr.ndim == 3 and c == 1:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] != c and arr.shape[3] == c:
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1:] != shape:
        raise ValueError(f"{path}: expected images of shape [N, {c}, {h}, {w}] (or [N, {h}, "
                         f"{w}, {c}]), got {list(arr.shape)}")  # fmt: skip
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: expected integer pixel values in 0..{model.levels - 1}, "
                         f"got {arr.dtype}")  # fmt: skip
    if arr.size and (arr.min() < 0 or arr.max() >= model.levels):
        raise ValueError(f"{path}: pixel values must lie in 0..{model.levels - 1} (the model's "
                         f"levels), got {arr.min()}..{arr.max()}")  # fmt: skip
    return torch.from_numpy(np.ascontiguousarray(arr))


def write_scores(
    path: str | Path, inputs: Sequence[ScoreInput], scores: Sequence[Scores], unit: str
) -> Path:
    """``source,name,<unit>,stderr`` rows (``.csv``; the per-input standard error, empty
    where unknown) or ``{"unit", "sources": [{"source", "n", "mean", "stderr",
    "noise_stderr", "repeats", "hutchinson", "scores": [{"name", "value", "stderr"}]}]}``
    (``.json``; ``stderr`` of a source: across its inputs; ``noise_stderr``: the
    estimator's part; unknown values are null), written atomically."""
    path = Path(path)
    column = "bits_per_dim" if unit == "bits/dim" else "nll_nats"
    if path.suffix.lower() == ".csv":
        lines = [f"source,name,{column},stderr"]
        for inp, sc in zip(inputs, scores):
            rows = zip(inp.names, sc.values.tolist(), sc.stderr.tolist())
            lines += [f"{_csv(inp.source)},{_csv(n)},{x:.8g},{_num(e)}" for n, x, e in rows]
        atomic_write_text(path, "\n".join(lines) + "\n")
    elif path.suffix.lower() == ".json":
        sources = []
        for inp, sc in zip(inputs, scores):
            summary = sc.summary(unit)
            rows = zip(inp.names, sc.values.tolist(), sc.stderr.tolist())
            record: dict[str, object] = {
                "source": inp.source,
                "n": summary.n,
                "mean": summary.mean,
                "stderr": _finite(summary.stderr),
                "noise_stderr": _finite(sc.noise_stderr()),
                "repeats": sc.repeats,
                "hutchinson": sc.hutchinson,
                "scores": [{"name": n, "value": x, "stderr": _finite(e)} for n, x, e in rows],
            }
            if inp.columns is not None:
                record["columns"] = inp.columns
            sources.append(record)
        atomic_write_text(path, json.dumps({"unit": unit, "sources": sources}, indent=1))
    else:
        raise ValueError(f"--out {path}: scores are written as .csv or .json")
    return path


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _num(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else ""


def _csv(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def plot_score_histogram(
    groups: dict[str, Tensor], path: str | Path, unit: str, title: str = ""
) -> Path:
    """Overlaid histograms of the scores of each group (e.g. in- vs out-of-distribution
    test sets) on shared bins; the area under the ROC curve of telling the first group
    from each other by its score is in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resflow.io import atomic_write

    allv = torch.cat([v.double() for v in groups.values()])
    lo, hi = float(allv.quantile(0.001)), float(allv.quantile(0.999))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    first = next(iter(groups.values()))
    for i, (name, v) in enumerate(groups.items()):
        label = f"{name} (n={len(v)}, mean {float(v.mean()):.3f})"
        if i:
            label += f", AUROC {auroc(first, v):.3f}"
        ax.hist(v.clamp(lo, hi).numpy(), bins=bins, alpha=0.55, density=True, label=label)
    ax.set_xlabel(unit)
    ax.set_ylabel("density")
    ax.set_title(title or f"{unit} per input")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def auroc(inliers: Tensor, outliers: Tensor) -> float:
    """``P(score(outlier) > score(inlier))`` (ties count half): the area under the ROC
    curve of flagging outliers by a higher bits/dim."""
    a, b = inliers.double().flatten(), outliers.double().flatten()
    both = torch.cat([a, b])
    ranks = _ranks(both)
    rb = ranks[len(a) :].sum()
    return float((rb - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def _ranks(v: Tensor) -> Tensor:
    """1-based ranks with ties averaged."""
    order = torch.argsort(v)
    sorted_v = v[order]
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=v.dtype)
    uniq, inverse = torch.unique(sorted_v, return_inverse=True)
    if len(uniq) < len(v):
        mean_rank = torch.zeros(len(uniq), dtype=v.dtype).index_add_(
            0, inverse, torch.arange(1, len(v) + 1, dtype=v.dtype)
        ) / torch.bincount(inverse).to(v.dtype)
        ranks[order] = mean_rank[inverse]
    return ranks
