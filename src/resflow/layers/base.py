"""The layer contract (v2) shared by every invertible layer in resflow.

Every layer maps **data -> latent** and takes an optional conditioning tensor
``context`` (a class embedding, an image, ...) that it may use or ignore:

* ``forward(x, context=None) -> (y, logdet)`` with ``logdet = log|det dy/dx|`` of
  shape ``[batch]``;
* ``inverse(y, context=None) -> x``;
* ``inverse_and_logdet(y, context=None) -> (x, logdet_inv)`` with
  ``logdet_inv = log|det dx/dy| = -log|det dy/dx|`` evaluated at ``x = f^{-1}(y)``.
  The default inverts and runs one forward pass; layers whose inverse yields the
  log-determinant for free (coupling, ActNorm, autoregressive, 1x1 convolution)
  override it;
* ``output_shape(input_shape) -> shape`` of one example (no batch dimension), so that
  multi-scale models are assembled without hand-computed shapes. The default is the
  identity (shape-preserving layers).

**Stochastic layers.** A layer whose forward pass draws noise ``u ~ q(u | x)``
(uniform or variational dequantization, noise augmentation) sets
``stochastic = True`` and returns ``logdet = log|det dy/d(x, u)| - log q(u | x)``;
the dimension may grow (``output_shape`` says by how much). ``log p_base(f(x)) +
logdet`` is then a single-sample estimate of a lower bound on ``log p(x)`` (Jensen):
``E_q[log p(x, u) - log q(u | x)] <= log p(x)``; averaging ``exp`` of ``K`` such
estimates gives the importance-weighted bound. Its ``inverse`` is deterministic
(drop the noise channels, quantize) and its ``inverse_and_logdet`` returns the
negative of that forward term at the inverted point, so that ``sample_and_log_prob``
reports the same bound for the samples.

A :class:`Sequential` of layers is itself a layer, so models are built by composition.

**Hooks.** The optional methods a module may implement -- ``after_optimizer_step()``,
``transient_state()`` / ``load_transient_state(state)``, ``penalty()``, the
class-level ``after_optimizer_step_all(modules)`` and ``shared_scope(modules)``, ... --
are declared once, in :mod:`resflow.layers.hooks`. :func:`after_optimizer_step`,
:func:`shared_scope` and :func:`preserved_transient_state` run them on every
sub-module that implements them, without knowing which layers do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from resflow.layers.hooks import (
    AfterStep,
    AfterStepAll,
    SharedScope,
    TransientState,
    classes_implementing,
    implementers,
)
from resflow.value_checks import require

Shape = tuple[int, ...]


class FlowLayer(nn.Module):
    """Base class of an invertible layer (see the module docstring for the contract)."""

    #: ``True`` for layers that draw noise in ``forward`` (see the module docstring).
    stochastic: bool = False

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse")

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)`` for ``x = f^{-1}(y)``: by default the inverse, then
        ``-logdet`` of one forward pass at ``x``."""
        x = self.inverse(y, context)
        _, logdet = self.forward(x, context)
        return x, -logdet

    def output_shape(self, input_shape: Shape) -> Shape:
        """Shape of one output example for one input example of ``input_shape``."""
        return tuple(input_shape)


def is_stochastic(module: nn.Module) -> bool:
    """Whether ``module`` is a layer that draws noise in its forward pass."""
    return isinstance(module, FlowLayer) and module.stochastic is True


def zero_logdet(x: Tensor) -> Tensor:
    """A per-sample zero log-determinant matching ``x``'s batch, dtype and device."""
    return x.new_zeros(x.shape[0])


class Sequential(FlowLayer):
    """Composition of flow layers: ``forward`` applies them in order and sums logdets."""

    def __init__(self, *layers: FlowLayer | Iterable[FlowLayer]) -> None:
        super().__init__()
        if len(layers) == 1 and not isinstance(layers[0], nn.Module):
            layers = tuple(layers[0])  # type: ignore[arg-type]
        self.layers = nn.ModuleList(layers)  # type: ignore[arg-type]

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return any(is_stochastic(layer) for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> FlowLayer:
        return self.layers[i]  # type: ignore[return-value]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(x)
        for layer in self.layers:
            x, ld = layer(x, context)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y, context)
        return y

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(y)
        for layer in reversed(self.layers):
            y, ld = layer.inverse_and_logdet(y, context)
            logdet = logdet + ld
        return y, logdet

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape


class Inverse(FlowLayer):
    """Swap the directions of a layer: ``forward`` runs ``layer.inverse``.

    ``forward`` is the wrapped layer's ``inverse_and_logdet``; ``inverse`` its
    ``forward``. Shape-changing layers cannot be wrapped (their output shape would
    need the inverse map of shapes).
    """

    def __init__(self, layer: FlowLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer.inverse_and_logdet(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.layer(y, context)[0]

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer(y, context)  # log|det d f(y)/dy| is the wrapped forward logdet


def check_finite(x: Tensor, name: str = "input") -> None:
    """Raise a clear ``ValueError`` when ``x`` holds NaN or infinite values (at once, or
    when the checks are verified inside :func:`resflow.value_checks.deferred`)."""

    def error() -> ValueError:
        n_bad = int((~torch.isfinite(x)).sum())
        return ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")

    require(~torch.isfinite(x).all(), error)


def after_optimizer_step(model: nn.Module) -> None:
    """Run the :class:`~resflow.layers.hooks.AfterStep` hook of every sub-module (once
    for all instances of a class implementing
    :class:`~resflow.layers.hooks.AfterStepAll`).

    A training loop calls this after every optimizer step, and evaluation or sampling
    before use (the weights may have changed, e.g. to their EMA average).
    """
    grouped = classes_implementing(model, AfterStepAll)
    for cls, members in grouped.items():
        cls.after_optimizer_step_all(members)  # type: ignore[attr-defined]
    for m in implementers(model, AfterStep):
        if type(m) not in grouped:
            m.after_optimizer_step()


_scoped: set[int] = set()  # ids of the models inside shared_scope (re-entry is a no-op)


@contextmanager
def shared_scope(model: nn.Module) -> Iterator[None]:
    """Within the block, the instances of each class that defines
    ``shared_scope(modules)`` may share work computed once for all of them (e.g. every
    Lipschitz layer's rescaled weight, in a few batched products). The parameters must
    not change inside; a flow's forward and inverse passes open it themselves.
    Nested scopes of the same model are free."""
    if id(model) in _scoped:
        yield
        return
    _scoped.add(id(model))
    try:
        with ExitStack() as stack:
            for cls, members in classes_implementing(model, SharedScope).items():
                stack.enter_context(cls.shared_scope(members))  # type: ignore[attr-defined]
            yield
    finally:
        _scoped.discard(id(model))


@contextmanager
def preserved_transient_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's transient state (e.g. power-iteration vectors) on exit.

    Evaluating or sampling with other weights (the EMA average) updates such state for
    those weights; restoring it keeps training exactly on the path it would have taken
    without the detour (exact resume depends on it).
    """
    saved = [(m, m.transient_state()) for m in implementers(model, TransientState)]
    try:
        yield
    finally:
        for m, state in saved:
            m.load_transient_state(state)
