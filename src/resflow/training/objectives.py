"""Training objectives: what a training step minimizes, given a model and a batch.

An objective is a callable ``objective(model, batch) -> (loss, metrics)`` where
``batch`` is a :class:`Batch` (data and optional labels / context) and ``metrics``
holds floats to log. Maximum likelihood is the default; hybrid
(``lambda log p(x) + log p(y | x)``) and reverse-KL objectives plug in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from resflow.flow import Flow


@dataclass
class Batch:
    """One minibatch: data ``x``, optional class ``labels`` and ``context``."""

    x: Tensor
    labels: Tensor | None = None
    context: Tensor | None = None


class Objective(Protocol):
    """``objective(model, batch) -> (scalar loss, {name: float})``."""

    unit: str

    def __call__(self, model: Flow, batch: Batch) -> tuple[Tensor, dict[str, float]]: ...


class MaximumLikelihood:
    """Minimize mean bits/dim (discrete data) or mean negative log-likelihood in nats
    (continuous data); an unbiased estimate when logdets are stochastic. A
    class-conditional model gets the batch's labels as its context, and the model's
    :meth:`~resflow.flow.Flow.penalty` is added."""

    def __init__(self, model: Flow) -> None:
        self.unit = "bpd" if model.levels is not None else "nll"

    def __call__(self, model: Flow, batch: Batch) -> tuple[Tensor, dict[str, float]]:
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
