"""The multi-scale builder shared by every image flow (RealNVP, Dinh et al. 2017).

``[Squeeze] -> scale 0 -> Squeeze -> [FactorOut] -> scale 1 -> ... -> last scale ->
final``: a family gives the layers of each scale (``step(i, shape)``) and of the end
(``final(shape)``, which must end flat, e.g. with :class:`Flatten`); shapes come from
the layers' ``output_shape``, never by hand. The factored half's prior is pluggable
(``prior(i, half_shape, kept_shape)``: ``None`` for a standard normal, a
:class:`DiagonalPrior` or a :class:`ConditionalPrior`).
"""

from __future__ import annotations

from collections.abc import Callable

from resflow.layers.base import FlowLayer, Sequential, Shape
from resflow.layers.multiscale import FactorOut, Flatten, SplitPrior
from resflow.layers.squeeze import Squeeze

Step = Callable[[int, Shape], list[FlowLayer]]
PriorFactory = Callable[[int, Shape, Shape], SplitPrior | None]


def count_scales(
    shape: Shape, max_scales: int, squeeze_first: bool = False, min_size: int = 4
) -> int:
    """Scales that fit: at most ``max_scales``, while height and width stay
    ``>= min_size`` (halving after each scale)."""
    _, h, w = shape
    if squeeze_first:
        h, w = h // 2, w // 2
    n = 0
    while h >= min_size and w >= min_size:
        n, h, w = n + 1, h // 2, w // 2
    return min(max_scales, n)


def flatten_end(shape: Shape) -> list[FlowLayer]:
    """The default ``final``: flatten the last scale."""
    return [Flatten(shape)]


def multiscale(
    shape: Shape,
    n_scales: int,
    step: Step,
    *,
    final: Callable[[Shape], list[FlowLayer]] = flatten_end,
    squeeze_first: bool = False,
    factor_out: bool = False,
    prior: PriorFactory | None = None,
) -> list[FlowLayer]:
    """The layers of a multi-scale flow on images of ``shape`` (flat output).

    Args:
        shape: ``(C, H, W)`` entering the first scale (after preprocessing).
        n_scales: number of scales (see :func:`count_scales`).
        step: ``step(i, shape) -> layers`` of scale ``i`` on tensors of ``shape``.
        final: layers after the last scale (must end flat).
        squeeze_first: squeeze before the first scale.
        factor_out: factor out half of the channels after every squeeze between scales.
        prior: ``prior(i, half_shape, kept_shape)``: the factored half's prior after
            scale ``i``.
    """
    if n_scales < 1:
        raise ValueError(f"images of shape {shape} are too small for a multi-scale model")
    layers: list[FlowLayer] = []
    if squeeze_first:
        sq = Squeeze(2)
        shape = sq.output_shape(shape)
        layers.append(sq)

    def scale(i: int, shape: Shape) -> FlowLayer:
        body = Sequential(step(i, shape))
        out = body.output_shape(shape)
        if i == n_scales - 1:
            end = final(out)
            Sequential(end).output_shape(out)  # a clear error now if it does not fit
            return Sequential([*body.layers, *end])
        sq = Squeeze(2)
        squeezed = sq.output_shape(out)
        if factor_out:
            c, h, w = squeezed
            half, kept = (c // 2, h, w), (c - c // 2, h, w)
            split_prior = prior(i, half, kept) if prior is not None else None
            nxt: FlowLayer = FactorOut(scale(i + 1, kept), squeezed, split_prior)
        else:
            nxt = scale(i + 1, squeezed)
        return Sequential([*body.layers, sq, nxt])

    layers.append(scale(0, shape))
    return layers
