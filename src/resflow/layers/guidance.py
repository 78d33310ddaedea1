"""Classifier-free guidance for class-conditional flows: a null class learned by label
dropout, and guided predictions at sampling time.

* Training: :class:`ContextDropout` replaces the one-hot label of each example by the
  all-zero vector (the *null class*) with probability ``p``, the same for every layer
  it wraps, so the model learns ``p(x | y)`` and ``p(x) = p(x | null)`` at once.
* Sampling: a layer that supports guidance (TarFlow's block) predicts its parameters
  ``theta`` for the label and for the null class and uses

      ``theta_w = theta_null + w (theta_y - theta_null)``

  (:func:`guided`): ``w = 1`` is the plain conditional model, ``w = 0`` the
  unconditional one, ``w > 1`` pushes the samples towards their class (Ho & Salimans'
  ``(1 + s) theta_y - s theta_null`` is ``w = 1 + s``). TarFlow applies it to ``mu``
  and ``alpha`` of every block. :func:`guidance` sets ``w`` on every such layer of a
  model for the duration of a ``with`` block; the guided map is again an invertible
  autoregressive flow, so forward and inverse stay consistent under it.

References:
    Ho & Salimans (2021), Classifier-free diffusion guidance.
    Zhai et al. (2025), Normalizing flows are capable generative models (TarFlow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer, Shape
from resflow.layers.hooks import Guided, implementers


class ContextDropout(FlowLayer):
    """Run ``layer`` with each example's context zeroed with probability ``p`` (in
    training mode only; evaluation and ``inverse`` see the context unchanged).

    Example:
        >>> from resflow.layers.actnorm import ActNorm
        >>> layer = ContextDropout(ActNorm(3), p=0.1)
        >>> layer.eval()(torch.randn(2, 3), torch.eye(2))[0].shape
        torch.Size([2, 3])
    """

    def __init__(self, layer: FlowLayer, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"the label dropout must be in [0, 1), got {p}")
        self.layer = layer
        self.p = p

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and self.p > 0 and context is not None:
            keep = torch.rand(context.shape[0], device=context.device) >= self.p
            context = context * keep.view(-1, *([1] * (context.dim() - 1))).to(context.dtype)
        return self.layer(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.layer.inverse(y, context)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer.inverse_and_logdet(y, context)

    def output_shape(self, input_shape: Shape) -> Shape:
        return self.layer.output_shape(input_shape)


def guided(
    predict: Callable[[Tensor, Tensor | None], Tensor],
    x: Tensor,
    context: Tensor | None,
    weight: float | None,
) -> Tensor:
    """``predict(x, context)``, or with a guidance ``weight`` (and a context)
    ``theta_null + weight * (theta_y - theta_null)`` from one call on the doubled batch
    ``[x, x]`` with contexts ``[context, 0]``."""
    if weight is None or context is None:
        return predict(x, context)
    both = predict(torch.cat([x, x]), torch.cat([context, torch.zeros_like(context)]))
    cond, null = both.chunk(2)
    return null + weight * (cond - null)


def guidance_layers(model: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``model`` that take a guidance weight (the
    :class:`~resflow.layers.hooks.Guided` hook)."""
    return list(implementers(model, Guided))


@contextmanager
def guidance(model: nn.Module, weight: float | None) -> Iterator[None]:
    """Set the guidance ``weight`` on every guidable layer of ``model`` inside the
    ``with`` block (``None``: no guidance); a clear error for a model without any."""
    layers = guidance_layers(model)
    if weight is not None and not layers:
        raise ValueError("this model has no classifier-free guidance (no guidable layers)")
    saved = [m.guidance for m in layers]
    try:
        for m in layers:
            m.guidance = weight
        yield
    finally:
        for m, w in zip(layers, saved):
            m.guidance = w
