"""The optional hooks a module may implement, declared once.

resflow's generic code -- the training loop, evaluation, :class:`~resflow.flow.Flow`,
distributed training -- calls these on every sub-module of a model that implements
them, without knowing any family. A module implements a hook by defining the method
(or attribute) named here; it does not need to inherit anything. Every caller finds
the implementers through :func:`implementers` (or :func:`classes_implementing`), never
by probing names of its own.

=========================  ====================================================
hook                       what it is for
=========================  ====================================================
:class:`AfterStep`         refresh state after each optimizer step (and before
                           evaluation), e.g. Lipschitz layers' norm estimates
:class:`AfterStepAll`      the same, once for all instances of a class
:class:`SharedScope`       work shared by all instances inside a pass
:class:`TransientState`    state an evaluation detour must not disturb
:class:`Penalty`           a term added to the training loss
:class:`DensityNote`       what a log-density measures when it is not log p(x)
:class:`Guided`            classifier-free guidance weight while sampling
:class:`DataInitialized`   data-dependent initialisation (a 0-dim bool buffer
                           ``initialized``), broadcast under distributed training
:class:`BatchStatistics`   statistics of a batch, averaged over processes
:class:`Classifier`        a model that also classifies (hybrid models)
=========================  ====================================================

Stochastic layers are declared by :attr:`resflow.layers.base.FlowLayer.stochastic`.

>>> import torch
>>> from resflow.layers.actnorm import ActNorm
>>> layer = ActNorm(3)
>>> isinstance(layer, DataInitialized), isinstance(layer, Penalty)
(True, False)
>>> [type(m).__name__ for m in implementers(torch.nn.Sequential(layer), DataInitialized)]
['ActNorm']
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from functools import cache
from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class AfterStep(Protocol):
    """Called after every optimizer step, and before evaluation or sampling (the
    weights may have changed, e.g. to their EMA average)."""

    def after_optimizer_step(self) -> None: ...


@runtime_checkable
class AfterStepAll(Protocol):
    """A classmethod run *instead of* every instance's ``after_optimizer_step``, given
    all instances of the class in a model, in module order (batched work)."""

    @classmethod
    def after_optimizer_step_all(cls, modules: list[Any]) -> None: ...


@runtime_checkable
class SharedScope(Protocol):
    """A classmethod returning a context manager inside which all instances of the
    class in a model may use work done once for all of them; the parameters do not
    change inside."""

    @classmethod
    def shared_scope(cls, modules: list[Any]) -> AbstractContextManager[None]: ...


@runtime_checkable
class TransientState(Protocol):
    """State (e.g. power-iteration vectors) that an evaluation with other weights
    changes and that must be restored afterwards for exact resume."""

    def transient_state(self) -> Any: ...

    def load_transient_state(self, state: Any) -> None: ...


@runtime_checkable
class Penalty(Protocol):
    """A scalar added to the training loss (e.g. an L2 on weight-norm scales)."""

    def penalty(self) -> Tensor: ...


@runtime_checkable
class DensityNote(Protocol):
    """One phrase saying what the model's log-density measures when it is not that of
    the data (e.g. of noise-augmented data)."""

    def density_note(self) -> str: ...


@runtime_checkable
class Guided(Protocol):
    """A layer with a classifier-free guidance weight (``None``: off) that sampling
    sets for its duration."""

    guidance: float | None


@runtime_checkable
class DataInitialized(Protocol):
    """A layer initialised from its first batch by ``initialize(x)`` (and, when its
    first use is an inverse pass, ``initialize_inverse(y)``, which may be absent);
    ``initialized`` is a 0-dim bool buffer (so that it is saved, and broadcast from
    rank 0 under torchrun)."""

    initialized: Tensor

    def initialize(self, x: Tensor) -> None: ...


@runtime_checkable
class BatchStatistics(Protocol):
    """A layer normalising by ``batch_statistics(x) -> (mean, var)``, which
    distributed training replaces by the statistics over every process's batch."""

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class Classifier(Protocol):
    """A model that also classifies its input (a hybrid model): ``n_labels`` classes,
    and the log-density and class logits from one forward pass."""

    n_labels: int

    def log_prob_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


H = TypeVar("H")


@cache
def _class_implements(cls: type, hook: type) -> bool:
    members = [n for n in vars(hook) if not n.startswith("_")]
    members += list(getattr(hook, "__annotations__", {}))
    return all(_has(cls, n) for n in members)


def _has(cls: type, name: str) -> bool:
    return any(name in vars(c) or name in getattr(c, "__annotations__", {}) for c in cls.__mro__)


@cache
def _has_data_members(hook: type) -> bool:
    """Whether ``hook`` declares attributes, which an instance may hold without its
    class declaring them (methods a class either has or has not)."""
    return bool(getattr(hook, "__annotations__", {}))


def implements(module: object, hook: type) -> bool:
    """Whether ``module`` implements ``hook``: every member the hook declares is a
    method or attribute of its class or of the instance (attributes set in
    ``__init__`` and buffers count). A cheap ``isinstance(module, hook)``: the class
    decides, cached, unless the hook declares attributes and the class lacks them."""
    if _class_implements(type(module), hook):
        return True
    return _has_data_members(hook) and isinstance(module, hook)


def implementers(model: nn.Module, hook: type[H]) -> Iterator[H]:
    """The sub-modules of ``model`` (itself included) implementing ``hook``, in
    module order."""
    for m in model.modules():
        if implements(m, hook):
            yield m  # type: ignore[misc]


def classes_implementing(model: nn.Module, hook: type) -> dict[type, list[nn.Module]]:
    """The sub-modules whose *class* implements ``hook`` (a class-level hook such as
    :class:`AfterStepAll`), grouped by class, in module order."""
    out: dict[type, list[nn.Module]] = {}
    for m in model.modules():
        if _class_implements(type(m), hook):
            out.setdefault(type(m), []).append(m)
    return out
