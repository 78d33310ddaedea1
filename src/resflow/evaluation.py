"""Evaluation: bits/dim or NLL over a data set (mean +- standard error), sampling
(decoding with classifier-free guidance and one-step denoising), latent
interpolation, and image grids.

Bits/dim for data with ``L`` quantization levels (``L = 256`` for 8-bit images):
``bpd = -(log p(y) - D log L) / (D ln 2)`` where ``y = (x + u) / L`` is the dequantized
data in ``[0, 1)`` and ``D`` the number of dimensions; a uniform model scores
``log2 L`` (8.0 for 8-bit data).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from resflow.flow import Flow
from resflow.io import atomic_write
from resflow.layers.base import Sequential, after_optimizer_step
from resflow.layers.base import is_stochastic as stochastic_layer
from resflow.layers.guidance import guidance as guidance_weight
from resflow.layers.hooks import Classifier, DensityNote, implementers, implements
from resflow.layers.residual.block import ResidualBlock
from resflow.layers.residual.model_estimators import biased_figure, evaluation_estimators
from resflow.preprocess.noise import GaussianNoise


def bits_per_dim(log_prob: Tensor, dim: int, levels: int = 256) -> Tensor:
    """``-(log p(y) - D log(levels)) / (D ln 2)`` from the density ``p(y)`` of the
    dequantized data ``y`` in ``[0, 1)``. (A :class:`Flow` with a dequantizer already
    includes the ``-D log(levels)`` term: its ``bits_per_dim`` is ``-log p / (D ln 2)``.)"""
    return -(log_prob - dim * math.log(levels)) / (dim * math.log(2))


@dataclass
class EvalResult:
    """Mean and standard error over a data set; ``unit`` is ``"bits/dim"`` or ``"nats"``;
    ``note`` says what was measured when it is not the data's likelihood (e.g. that of
    noise-augmented data, :func:`density_note`).

    ``extra`` holds other figures of the same data, each under a label that says what it
    is (e.g. a biased estimate that a paper reports), printed after the main one:
    ``1.2000 +- 0.0100 bits/dim (n=64); biased (...): 1.1500 +- 0.0100 bits/dim``.
    """

    mean: float
    stderr: float
    n: int
    unit: str
    note: str = ""
    accuracy: float | None = None
    """Classification accuracy of a model with a classifier (hybrid models), else None."""
    extra: dict[str, EvalResult] = field(default_factory=dict)
    """Labelled second figures (label -> result), printed after the main one."""

    def figure(self) -> str:
        """``mean +- stderr unit``."""
        err = f"{self.stderr:.4f}" if math.isfinite(self.stderr) else "n/a"
        return f"{self.mean:.4f} +- {err} {self.unit}"

    def __str__(self) -> str:
        note = f", {self.note}" if self.note else ""
        acc = "" if self.accuracy is None else f", accuracy {100 * self.accuracy:.2f}%"
        extra = "".join(f"; {label}: {r.figure()}" for label, r in self.extra.items())
        return f"{self.figure()} (n={self.n}){acc}{note}{extra}"


def density_note(model: torch.nn.Module) -> str:
    """What the model's log-density measures, from its layers' ``density_note()``
    (noise augmentation: the likelihood of the noisy data); empty for a plain model."""
    return "; ".join(m.density_note() for m in implementers(model, DensityNote))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters, else of its buffers, else the CPU (a flow
    without parameters, e.g. a fixed preprocessing chain, is evaluated too)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def is_stochastic(model: torch.nn.Module) -> bool:
    """Whether the model's log-density in eval mode is a random estimate: it has a
    stochastic layer (dequantization, noise augmentation) or a residual block whose
    evaluation logdet may be a power series (Hutchinson vectors, roulette). The blocks
    of a vector flow see the data's dimension, which resolves ``"auto"``; elsewhere an
    ``"auto"`` block counts as random."""
    dim = model.dim if isinstance(model, Flow) and len(model.shape) == 1 else None

    def series(block: ResidualBlock) -> bool:
        est = block.eval_estimator
        return (est.resolve(dim) if dim is not None else est).method != "exact"

    return any(
        stochastic_layer(m) or (isinstance(m, ResidualBlock) and series(m)) for m in model.modules()
    )


@contextmanager
def hutchinson_vectors(model: torch.nn.Module, k: int) -> Iterator[None]:
    """Inside the block, every residual block's evaluation logdet averages ``k``
    Hutchinson vectors per example (the trace estimate's variance falls as ``1 / k``);
    the blocks' own estimators are restored after it."""
    if k < 1:
        raise ValueError(f"the number of Hutchinson vectors must be >= 1, got {k}")
    if not any(isinstance(m, ResidualBlock) for m in model.modules()):
        raise ValueError(
            "--hutchinson: this model has no residual blocks (no Hutchinson trace estimate)"
        )
    with evaluation_estimators(
        model, lambda b: dataclasses.replace(b.eval_estimator, n_hutchinson=k)
    ):
        yield


@torch.no_grad()
def per_example(
    model: Flow,
    data: Tensor,
    batch_size: int = 256,
    progress: bool = False,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Bits/dim (discrete data, ``model.levels`` set) or NLL in nats of every example,
    in order (``float64 [N]``): what :func:`evaluate` averages and ``resflow score``
    writes. Same settings as :func:`evaluate` (eval mode, Lipschitz refresh; ``labels``
    are the context of a class-conditional model and ignored otherwise)."""
    return _per_example(model, data, batch_size, progress, device, labels)[0][:, 0]


@torch.no_grad()
def per_example_draws(
    model: Flow,
    data: Tensor,
    repeats: int,
    batch_size: int = 256,
    progress: bool = False,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """``float64 [N, repeats]``: ``repeats`` independent draws of :func:`per_example`'s
    value of every example (fresh dequantization noise, Hutchinson vectors and roulette
    per draw; each batch is passed ``repeats`` times). The first column is
    :func:`per_example`'s values when ``repeats = 1``; a deterministic model repeats
    itself."""
    if repeats < 1:
        raise ValueError(f"the number of draws per example must be >= 1, got {repeats}")
    return _per_example(model, data, batch_size, progress, device, labels, repeats)[0]


def _per_example(
    model: Flow,
    data: Tensor,
    batch_size: int,
    progress: bool,
    device: torch.device | str | None,
    labels: Tensor | None,
    repeats: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """``(values [N, repeats], predicted classes [N] or None)``; the classes (from the
    first draw) for a model with a classifier (``log_prob_and_logits``, e.g. a hybrid
    model) given the ``labels``."""
    if len(data) == 0:
        raise ValueError("nothing to evaluate: the data set is empty")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 (--batch-size), got {batch_size}")
    if labels is not None and len(labels) != len(data):
        raise ValueError(f"{len(labels)} labels for {len(data)} examples")
    if model.n_classes is not None and labels is None:
        raise ValueError("a class-conditional model is evaluated with the data's labels")
    if model.context_features and labels is None:
        raise ValueError("a conditional model is evaluated with the data's contexts")
    classify = labels is not None and implements(model, Classifier)
    was_training = model.training
    model.eval()
    device = device or model_device(model)
    values, predicted = [], []
    scale = model.dim * math.log(2) if model.levels is not None else 1.0
    batches = range(0, len(data), batch_size)
    try:
        after_optimizer_step(model)
        for i in tqdm(batches, desc="eval", disable=not progress, leave=False):
            x = data[i : i + batch_size].to(device)
            y = None if labels is None else labels[i : i + batch_size].to(device)
            context = y if model.n_classes is not None or model.context_features else None
            draws = []
            for r in range(repeats):
                if classify:
                    log_p, logits = model.log_prob_and_logits(x)  # type: ignore[operator]
                    if r == 0:
                        predicted.append(logits.argmax(1).cpu())
                else:
                    log_p = model.log_prob(x, context)
                draws.append((-log_p / scale).double().cpu())
            values.append(torch.stack(draws, 1))
    finally:
        model.train(was_training)
    v = torch.cat(values)
    bad = int((~torch.isfinite(v)).any(1).sum())
    if bad:
        raise FloatingPointError(
            f"the model gives a non-finite log-density for {bad} of {len(v)} examples; "
            "it is broken (diverged weights?) or the data are not what it was trained on"
        )
    return v, (torch.cat(predicted) if classify else None)


@torch.no_grad()
def evaluate(
    model: Flow,
    data: Tensor,
    batch_size: int = 256,
    progress: bool = False,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
    biased: bool = True,
) -> EvalResult:
    """Mean +- standard error of the per-sample bits/dim (discrete data,
    ``model.levels`` set) or NLL in nats (``-log p(x | y)`` of a class-conditional
    model, given the ``labels``); for a model with a classifier (a hybrid model) given
    the ``labels``, also its accuracy.

    The model is put in eval mode (for residual flows: the exact logdet for small
    blocks, else 20 exact terms + an unbiased tail) and its ``after_optimizer_step``
    hooks run first (Lipschitz estimates are refreshed); the caller's mode is restored.

    A model whose paper reports a biased figure (i-ResNet's truncated series,
    :func:`~resflow.layers.residual.model_estimators.biased_figure`) gets it in ``result.extra``,
    under a label that says so, beside the true figure (``biased=False``: not computed).
    """
    v, predicted = _per_example(model, data, batch_size, progress, device, labels)
    unit = "bits/dim" if model.levels is not None else "nats"
    result = _summary(v[:, 0], unit, density_note(model))
    if predicted is not None:
        assert labels is not None
        result.accuracy = float((predicted == labels.cpu()).double().mean())
    label = biased_figure(model) if biased else None
    if label is not None:
        with evaluation_estimators(model, lambda b: b.biased_estimator or b.eval_estimator):
            w, _ = _per_example(model, data, batch_size, progress, device, labels)
        result.extra[label] = _summary(w[:, 0], unit)
    return result


@dataclass
class BoundResult:
    """The variational bound and the importance-weighted bound of a data set, each in
    bits/dim (discrete data) or nats, mean +- standard error over the examples. Both are
    negative log-likelihood bounds: the importance-weighted one is the tighter (its
    bits/dim are the lower)."""

    elbo: EvalResult
    iw: EvalResult
    k: int

    def __str__(self) -> str:
        return f"variational bound {self.elbo}; importance-weighted bound (K={self.k}) {self.iw}"


def _summary(v: Tensor, unit: str, note: str = "") -> EvalResult:
    n = len(v)
    stderr = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    return EvalResult(float(v.mean()), stderr, n, unit, note)


@torch.no_grad()
def evaluate_bounds(
    model: Flow,
    data: Tensor,
    k: int = 16,
    batch_size: int = 256,
    progress: bool = False,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
) -> BoundResult:
    """Per example, ``K`` draws of a stochastic model's log-density estimate ``l_k =
    log p(x, u_k) - log q(u_k | x)`` (dequantization noise ``u_k ~ q(u | x)``):

    * the variational bound ``mean_k l_k`` (an estimate of ``E_q[l]``);
    * the importance-weighted bound ``log mean_k exp(l_k)`` (Burda et al. 2016), which
      is ``>=`` the first for the same draws, increases with ``K`` in expectation and
      tends to ``log P(x)`` (Flow++ evaluates its models this way).

    Both are reported like :func:`evaluate` (bits/dim for discrete data, nats else),
    mean +- standard error over the examples; ``batch_size`` counts rows of ``K``
    repeated examples. For a deterministic model the two coincide.
    """
    if k < 1:
        raise ValueError(f"the number of importance samples must be >= 1, got {k}")
    if len(data) == 0:
        raise ValueError("nothing to evaluate: the data set is empty")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 (--batch-size), got {batch_size}")
    if model.n_classes is None:
        labels = None
    elif labels is None or len(labels) != len(data):
        raise ValueError("a class-conditional model is evaluated with one label per example")
    was_training = model.training
    model.eval()
    device = device or model_device(model)
    scale = model.dim * math.log(2) if model.levels is not None else 1.0
    per_chunk = max(1, batch_size // k)
    elbo, iw = [], []
    chunks = range(0, len(data), per_chunk)
    try:
        after_optimizer_step(model)
        for i in tqdm(chunks, desc="eval", disable=not progress, leave=False):
            x = data[i : i + per_chunk].to(device).repeat_interleave(k, 0)
            y = None if labels is None else labels[i : i + per_chunk].to(device)
            y = None if y is None else y.repeat_interleave(k, 0)
            rows = [
                model.log_prob(x[j : j + batch_size], None if y is None else y[j : j + batch_size])
                for j in range(0, len(x), batch_size)
            ]
            logp = torch.cat(rows).double().cpu().view(-1, k)
            elbo.append(-logp.mean(1) / scale)
            iw.append(-(torch.logsumexp(logp, 1) - math.log(k)) / scale)
    finally:
        model.train(was_training)
    e, w = torch.cat(elbo), torch.cat(iw)
    if not (torch.isfinite(e).all() and torch.isfinite(w).all()):
        raise FloatingPointError("the model gives a non-finite log-density for some examples")
    unit = "bits/dim" if model.levels is not None else "nats"
    note = density_note(model)
    return BoundResult(_summary(e, unit, note), _summary(w, unit, note), k)


def decode(
    model: Flow,
    z: Tensor,
    context: Tensor | None = None,
    denoise: bool = False,
    guidance: float | None = None,
) -> Tensor:
    """Data ``model.inverse(z, context)`` for latents ``z`` (no gradients), optionally

    * with classifier-free guidance of weight ``guidance`` (class-conditional models
      with guidable layers, TarFlow: ``theta = theta_null + w (theta_y - theta_null)``
      on ``mu`` and ``alpha``, see :mod:`resflow.layers.guidance`; 1 is the plain
      conditional model, 0 the unconditional one);
    * ``denoise``: for a model trained with Gaussian noise augmentation of std
      ``sigma`` (:class:`~resflow.preprocess.noise.GaussianNoise`), decode to the noisy
      ``y`` just after the noise layer, take one step of Tweedie's formula with the
      model's own score, ``x_hat = y + sigma^2 grad_y log p(y | context)`` (autograd
      through the unguided log-density), and decode ``x_hat`` through the layers
      before it (the quantization of the dequantizer).
    """
    if guidance is not None and model.n_classes is None:
        raise ValueError("--guidance needs a class-conditional model (train with --conditional)")
    ctx = model.condition(context, z.shape[0])
    layers = list(model.layers.layers) if isinstance(model.layers, Sequential) else [model.layers]
    noise = [i for i, layer in enumerate(layers) if isinstance(layer, GaussianNoise)]
    if denoise and not noise:
        raise ValueError(
            "--denoise: this model was trained without noise augmentation (noise_std = 0); "
            "there is nothing to denoise"
        )
    cut = noise[-1] + 1 if denoise else 0
    head, tail = Sequential(layers[:cut]), Sequential(layers[cut:])
    with torch.no_grad(), guidance_weight(model, guidance):
        y = tail.inverse(z, ctx)
    if denoise:
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            u, logdet = tail(y, ctx)
            log_p = model.base.log_prob(u, ctx) + logdet
            (score,) = torch.autograd.grad(log_p.sum(), y)
        std = layers[cut - 1].std  # type: ignore[union-attr]
        y = y.detach() + std**2 * score
    with torch.no_grad():
        return head.inverse(y, ctx)


@torch.no_grad()
def interpolate(model: Flow, x0: Tensor, x1: Tensor, steps: int = 8) -> Tensor:
    """Decode points on the straight line between the latents of ``x0`` and ``x1``.

    Returns ``[steps, *model.shape]`` (images come back as integer levels).
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
    model.eval()
    z, _ = model(torch.stack([x0, x1]))
    t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype).view(-1, 1)
    return model.inverse((1 - t) * z[:1] + t * z[1:])


def image_grid(images: Tensor, levels: int = 256, nrow: int | None = None) -> np.ndarray:
    """Tile ``[N, C, H, W]`` integer-level images into one uint8 ``[H', W', C]`` array."""
    x = images.detach().float().cpu()
    x = (x.clamp(0, levels - 1) * (255.0 / (levels - 1))).round().to(torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = torch.full((c, ncol * (h + 2) + 2, nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = x[i]
    out = grid.permute(1, 2, 0).numpy()
    return out[:, :, 0] if c == 1 else out


def save_image_grid(
    images: Tensor, path: str | Path, levels: int = 256, nrow: int | None = None, scale: int = 1
) -> Path:
    """Write :func:`image_grid` as a PNG (``scale`` enlarges small images)."""
    from PIL import Image

    img = Image.fromarray(image_grid(images, levels, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


GRID_HEAD, GRID_GAP = 24, 8
"""Pixels of the heading above, and of the gap between, the panels of
:func:`save_temperature_grids`."""


def save_temperature_grids(
    grids: list[tuple[float, Tensor]], path: str | Path, levels: int = 256, scale: int = 1
) -> Path:
    """Write one PNG with a panel per ``(temperature, images)``, side by side, each
    headed ``T = temperature`` (flows are judged by their reduced-temperature samples)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=GRID_HEAD - 8)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    panels = []
    for _, images in grids:
        img = Image.fromarray(image_grid(images, levels)).convert("RGB")
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        panels.append(img)
    head, gap = GRID_HEAD, GRID_GAP
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = head + max(p.height for p in panels)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for (temperature, _), panel in zip(grids, panels):
        canvas.paste(panel, (left, head))
        draw.text((left + 2, 2), f"T = {temperature:g}", fill=(0, 0, 0), font=font)
        left += panel.width + gap
    return atomic_write(path, lambda f: canvas.save(f, format="PNG"))
