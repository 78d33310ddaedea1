"""A flow as a ``torch.distributions.Distribution``, so that it drops into code written
for torch's (or Pyro's, or sbi's) distributions unchanged.

:func:`as_distribution` wraps a vector flow, optionally given a context: without one
the distribution has ``batch_shape == ()``; with a context of shape
``[*batch_shape, *context_event]`` (class labels ``[*batch_shape]`` for a
class-conditional flow, feature vectors ``[*batch_shape, k]`` for a flow with
``context_features = k``) it is a batch of conditional distributions, one per context.
``log_prob`` takes values of shape ``[*sample_shape, *batch_shape, *event_shape]``
(with broadcasting over the batch), ``sample(sample_shape)`` draws without gradients
and ``rsample(sample_shape)`` with them (reparameterized through the flow's inverse).

>>> import torch
>>> from resflow.models import build_model, get_preset
>>> flow = build_model(get_preset("maf-toy2d")).eval()
>>> d = as_distribution(flow)
>>> d.batch_shape, d.event_shape
(torch.Size([]), torch.Size([2]))
>>> x = d.sample((5, 3))
>>> x.shape, d.log_prob(x).shape
(torch.Size([5, 3, 2]), torch.Size([5, 3]))
"""

from __future__ import annotations

import math

import torch
from torch import Size, Tensor
from torch.distributions import Distribution, constraints

from resflow.flow import Flow


class FlowDistribution(Distribution):
    """A vector :class:`~resflow.flow.Flow` (and a context) as a torch distribution
    (see the module docstring)."""

    arg_constraints: dict[str, constraints.Constraint] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self, flow: Flow, context: Tensor | None = None, validate_args: bool | None = None
    ) -> None:
        if flow.levels is not None or len(flow.shape) != 1:
            raise ValueError(
                "as_distribution wraps flows of real vectors; this flow models "
                f"{'discrete data' if flow.levels is not None else 'images'} of shape "
                f"{flow.shape}"
            )
        self.flow = flow
        self.context = context
        self._context_dims = _context_event_dims(flow)
        if context is None:
            batch_shape = Size()
            if self._context_dims is not None:
                raise ValueError("this flow is conditional: pass a context")
        else:
            if self._context_dims is None:
                raise ValueError("this flow takes no context")
            cut = context.dim() - self._context_dims
            if cut < 0:
                raise ValueError(f"context of shape {list(context.shape)} has too few dimensions")
            batch_shape = context.shape[:cut]
        super().__init__(batch_shape, Size(flow.shape), validate_args=validate_args)

    def expand(self, batch_shape: Size, _instance: object = None) -> FlowDistribution:
        batch_shape = Size(batch_shape)
        if self.context is None:
            if batch_shape != Size():
                raise ValueError("an unconditional flow has batch_shape (); pass a context")
            return FlowDistribution(self.flow, None, self._validate_args)
        tail = self.context.shape[self.context.dim() - self._context_dims :]
        context = self.context.expand(*batch_shape, *tail)
        return FlowDistribution(self.flow, context, self._validate_args)

    def _flat_context(self, leading: Size) -> Tensor | None:
        """The context repeated for ``leading = sample_shape + batch_shape`` values, flat."""
        if self.context is None:
            return None
        tail = self.context.shape[self.context.dim() - self._context_dims :]
        return self.context.expand(*leading, *tail).reshape(-1, *tail)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        event = len(self.event_shape)
        leading = torch.broadcast_shapes(value.shape[: value.dim() - event], self.batch_shape)
        value = value.expand(*leading, *self.event_shape)
        n = math.prod(leading)
        flat = value.reshape(n, *self.event_shape).to(self.flow.dtype)
        return self.flow.log_prob(flat, self._flat_context(leading)).reshape(leading)

    def rsample(self, sample_shape: Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        leading = shape[: len(shape) - len(self.event_shape)]
        n = math.prod(leading)
        if n == 0:
            return torch.empty(shape, dtype=self.flow.dtype)
        x = self.flow.rsample(n, context=self._flat_context(leading))
        return x.reshape(shape)

    def sample(self, sample_shape: Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


def _context_event_dims(flow: Flow) -> int | None:
    """Dimensions of one context: 0 for class labels, 1 for feature vectors, ``None`` for
    an unconditional flow."""
    if flow.n_classes is not None:
        return 0
    if flow.context_features:
        return 1
    return None


def as_distribution(
    flow: Flow, context: Tensor | None = None, validate_args: bool | None = None
) -> FlowDistribution:
    """``flow`` (given ``context``) as a :class:`torch.distributions.Distribution`."""
    return FlowDistribution(flow, context, validate_args)
