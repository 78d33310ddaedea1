"""Training objectives: what a training step minimizes, given a model and a batch.

An objective is a callable ``objective(model, batch) -> (loss, metrics)`` where
``batch`` is a :class:`Batch` (data and optional labels / context) and ``metrics``
holds values to log (floats, or one-element tensors that the trainer reads only at the
steps it logs). Maximum likelihood is the default; hybrid
(``lambda log p(x) + log p(y | x)``) and reverse-KL objectives plug in the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor

from resflow.flow import Flow
from resflow.models.hybrid import HybridFlow
from resflow.value_checks import require


@dataclass
class Batch:
    """One minibatch: data ``x``, optional class ``labels`` and ``context``."""

    x: Tensor
    labels: Tensor | None = None
    context: Tensor | None = None


Metrics = dict[str, float | Tensor]


class Objective(Protocol):
    """``objective(model, batch) -> (scalar loss, {name: value})``."""

    unit: str

    def __call__(self, model: Flow, batch: Batch) -> tuple[Tensor, Metrics]: ...


class MaximumLikelihood:
    """Minimize mean bits/dim (discrete data) or mean negative log-likelihood in nats
    (continuous data); an unbiased estimate when logdets are stochastic. A
    class-conditional model gets the batch's labels as its context, and the model's
    :meth:`~resflow.flow.Flow.penalty` is added."""

    def __init__(self, model: Flow) -> None:
        self.unit = "bpd" if model.levels is not None else "nll"

    def __call__(self, model: Flow, batch: Batch) -> tuple[Tensor, Metrics]:
        context = batch.context
        if context is None and model.n_classes is not None:
            if batch.labels is None:
                raise ValueError("a class-conditional model needs labelled training data")
            context = batch.labels
        if model.levels is not None:
            loss = model.bits_per_dim(batch.x, context).mean()
        else:
            loss = -model.log_prob(batch.x, context).mean()
        return loss + model.penalty().to(loss.device), {}


class Hybrid:
    """Minimize ``-(lambda log p(x) + log p(y | x))`` per example, batch mean, in nats
    (Residual Flows paper, section 5): the density and the classifier of a
    :class:`~resflow.models.hybrid.HybridFlow` share the flow. ``lambda`` is the model's
    (``density_weight`` / ``per_dim``) unless given; with ``lambda = 0`` the density
    term is left out and the flow is trained as a pure classifier. Logs the batch's
    ``bpd`` (or ``nll``), cross-entropy ``xent`` and accuracy ``acc``."""

    unit = "loss"

    def __init__(self, model: Flow, lam: float | None = None) -> None:
        if not isinstance(model, HybridFlow):
            raise ValueError("the hybrid objective needs a hybrid model (residual-flow-hybrid)")
        self.lam = model.lam if lam is None else float(lam)
        if not self.lam >= 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")

    def __call__(self, model: Flow, batch: Batch) -> tuple[Tensor, Metrics]:
        assert isinstance(model, HybridFlow)
        y = batch.labels
        if y is None:
            raise ValueError("a hybrid model needs labelled training data")
        n = model.n_labels

        def out_of_range() -> ValueError:
            bad = int(y[(y < 0) | (y >= n)][0])
            return ValueError(f"label {bad} is out of range: the classifier has {n}")

        if len(y):
            require((y.min() < 0) | (y.max() >= n), out_of_range)
        log_px, logits = model.log_prob_and_logits(batch.x)
        xent = F.cross_entropy(logits, y)
        loss = xent if self.lam == 0 else xent - self.lam * log_px.mean()
        scale = model.dim * math.log(2) if model.levels is not None else 1.0
        name = "bpd" if model.levels is not None else "nll"
        acc = (logits.argmax(1) == y).float().mean()
        metrics: Metrics = {name: -log_px.detach().mean() / scale, "xent": xent.detach(),
                            "acc": acc}  # fmt: skip
        return loss + model.penalty().to(loss.device), metrics


def default_objective(model: Flow) -> Objective:
    """:class:`Hybrid` for a hybrid model, else :class:`MaximumLikelihood`."""
    return Hybrid(model) if isinstance(model, HybridFlow) else MaximumLikelihood(model)
