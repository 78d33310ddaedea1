"""Fitting a flow to an unnormalized density by reverse KL (variational inference).

With samples ``x = f(z)``, ``z ~ q_0``, drawn *with gradients* (reparameterized)
and their log-density ``log q(x)`` from the same pass,

    KL(q || p) = E_q[log q(x) - log p~(x)] + log Z,

so minimizing ``E_q[log q - log p~]`` needs no normalizer and no data. Which direction of
the flow is the sampler matters: :func:`sampling_direction` turns a density model into
one that samples through its cheap direction (an IAF from a MAF; a residual flow whose
forward pass with its logdet estimate draws the samples, no fixed-point iteration).

:func:`estimate_kl` reports the KL (when ``log Z`` is known), the importance-sampling
estimate of ``log Z`` and the effective sample size of the weights ``p~ / q``.

References:
    Rezende & Mohamed (2015), Variational inference with normalizing flows.
    Kingma et al. (2016), Improved variational inference with inverse autoregressive flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from resflow.flow import Flow
from resflow.layers.base import Inverse, after_optimizer_step
from resflow.training.objectives import Batch
from resflow.vi.targets import Target


def sampling_direction(model: Flow) -> Flow:
    """The same layers and base with the directions swapped: sampling runs the model's
    *forward* (density) pass, density evaluation its inverse. Parameters are shared."""
    if model.latent_shape != model.shape:
        raise ValueError(
            f"sampling_direction needs a model whose latent has the data's shape, got "
            f"{model.shape} -> {model.latent_shape}"
        )
    return Flow(Inverse(model.layers), model.shape, base=model.base, n_classes=model.n_classes)


@dataclass(frozen=True)
class ReverseKLConfig:
    """The settings of a reverse-KL fit (:func:`fit_reverse_kl`, :func:`estimate_kl` and
    ``resflow vi``), each default stated here once.

    Attributes:
        steps: Adam steps, with a cosine decay of the learning rate to 0.
        batch_size: fresh samples of the flow per step.
        lr: the initial learning rate (the one of docs/RESULTS.md's measurements).
        grad_clip: the largest gradient norm of a step.
        anneal: steps over which the target's inverse temperature rises to 1 (0: none).
        beta0: the inverse temperature annealing starts from.
        n_eval: samples of the flow for :func:`estimate_kl`.
        seed: of the fit's random draws.
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-3
    grad_clip: float = 10.0
    anneal: int = 0
    beta0: float = 0.05
    n_eval: int = 10_000
    seed: int = 0


DEFAULTS = ReverseKLConfig()
"""The default settings of a reverse-KL fit."""


class ReverseKL:
    """Objective ``E_q[log q(x) - log p~(x)]`` over ``batch_size`` fresh samples (the
    batch's data are ignored: there are none). Reported in nats; plus ``log Z`` to get
    the KL itself."""

    unit = "kl"

    def __init__(self, target: Target, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.target = target
        self.batch_size = batch_size
        self.beta = 1.0  # inverse temperature of the target (annealing: beta < 1)

    def __call__(self, model: Flow, batch: Batch | None = None) -> tuple[Tensor, dict[str, float]]:
        x, log_q = model.sample_and_log_prob(self.batch_size)
        log_w = self.beta * self.target(x) - log_q
        if not torch.isfinite(log_w).all():
            raise FloatingPointError(
                "reverse KL: non-finite log-weights (the flow drew samples where the target "
                "or its own log-density is not finite); lower the learning rate"
            )
        return -log_w.mean(), {}


@dataclass
class KLEstimate:
    """Reverse-KL diagnostics from ``n`` samples of ``q``.

    Attributes:
        kl_minus_log_z: ``E_q[log q - log p~]`` (mean) and its standard error.
        kl: ``kl_minus_log_z + log Z`` when the target's ``log Z`` is known.
        log_z: ``log mean_i p~(x_i) / q(x_i)``, an importance-sampling estimate of
            ``log Z`` (a lower bound in expectation).
        ess: effective sample size of the weights over ``n`` (1: q equals p).
    """

    kl_minus_log_z: float
    stderr: float
    kl: float | None
    log_z: float
    ess: float
    n: int

    def __str__(self) -> str:
        kl = "" if self.kl is None else f"KL {self.kl:.4f} +- {self.stderr:.4f} nats, "
        return (
            f"{kl}E_q[log q - log p~] {self.kl_minus_log_z:.4f} +- {self.stderr:.4f}, "
            f"log Z estimate {self.log_z:.4f}, ESS {self.ess:.3f} (n={self.n})"
        )


@torch.no_grad()
def estimate_kl(
    model: Flow, target: Target, n: int = DEFAULTS.n_eval, batch_size: int = 2000
) -> KLEstimate:
    """:class:`KLEstimate` of ``q`` (the model) against ``target`` from ``n`` samples."""
    model.eval()
    after_optimizer_step(model)
    parts = []
    for i in range(0, n, batch_size):
        x, log_q = model.sample_and_log_prob(min(batch_size, n - i))
        parts.append((target(x) - log_q).double())
    log_w = torch.cat(parts)
    if not torch.isfinite(log_w).all():
        raise FloatingPointError("non-finite log-weights: the model's samples or density failed")
    mean, se = float(-log_w.mean()), float(log_w.std() / math.sqrt(len(log_w)))
    w = torch.softmax(log_w, 0)
    log_z = float(torch.logsumexp(log_w, 0)) - math.log(len(log_w))
    kl = None if target.log_z is None else mean + target.log_z
    return KLEstimate(mean, se, kl, log_z, float(1.0 / (w**2).sum()) / len(log_w), len(log_w))


def fit_reverse_kl(
    model: Flow,
    target: Target,
    steps: int = DEFAULTS.steps,
    batch_size: int = DEFAULTS.batch_size,
    lr: float = DEFAULTS.lr,
    grad_clip: float = DEFAULTS.grad_clip,
    progress: bool = True,
    seed: int = DEFAULTS.seed,
    anneal: int = DEFAULTS.anneal,
    beta0: float = DEFAULTS.beta0,
) -> list[dict[str, float]]:
    """Fit ``model`` (sampling in its cheap direction, e.g. :func:`sampling_direction`)
    to ``target`` by Adam on :class:`ReverseKL`; returns the loss per step (plus the KL
    where ``log Z`` is known) and leaves the model in evaluation mode.

    Reverse KL is mode-seeking: a flow started narrow may settle on some modes of a
    multimodal target. ``anneal > 0`` fits ``p~^beta`` with ``beta`` rising linearly
    from ``beta0`` to 1 over the first ``anneal`` steps (the annealed free energy of
    Rezende & Mohamed 2015), which spreads the flow over the flattened target first."""
    if target.dim != model.dim:
        raise ValueError(f"the target is {target.dim}-D but the model {model.dim}-D")
    if not 0 < beta0 <= 1 or anneal < 0:
        raise ValueError(f"need 0 < beta0 <= 1 and anneal >= 0, got {beta0} and {anneal}")
    torch.manual_seed(seed)
    objective = ReverseKL(target, batch_size)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    model.train()
    bar = tqdm(range(steps), disable=not progress, desc=f"reverse KL to {target.name}")
    for step in bar:
        objective.beta = min(1.0, beta0 + (1 - beta0) * step / anneal) if anneal else 1.0
        loss, _ = objective(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        after_optimizer_step(model)
        rec = {"step": step + 1, "loss": float(loss.detach()), "beta": objective.beta}
        if target.log_z is not None and objective.beta == 1.0:
            rec["kl"] = rec["loss"] + target.log_z
        history.append(rec)
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
    model.eval()
    return history
