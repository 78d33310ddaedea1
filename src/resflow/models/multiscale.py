"""The multi-scale builder shared by every image flow (RealNVP, Dinh et al. 2017).

``[Squeeze] -> scale 0 -> Squeeze -> [after_squeeze] -> [FactorOut] -> scale 1 -> ...
-> last scale -> final``: a family gives the layers of each scale (``step(i, shape)``),
optionally layers between a squeeze and the split (``after_squeeze(i, shape)``:
RealNVP's channel-wise couplings) and the layers of the end (``final(shape)``, which
must end flat, e.g. with :class:`Flatten`); shapes come from the layers'
``output_shape``, never by hand. ``split_first=True`` factors out *before* the
squeeze (Glow: ``squeeze -> K steps -> split`` per level). The factored half's prior
is pluggable (``prior(i, half_shape, kept_shape)``: ``None`` for a standard normal, a
:class:`DiagonalPrior` or a :class:`ConditionalPrior`).

The latent is flat: the half factored out after scale 0 comes first, the output of
the last scale last (finest to coarsest), see :func:`latent_sizes`.
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
    ``>= min_size`` (halving after each scale, which needs even sizes)."""
    _, h, w = shape
    if squeeze_first:
        h, w = h // 2, w // 2
    n = 0
    while h >= min_size and w >= min_size and n < max_scales:
        n += 1
        if h % 2 or w % 2:
            break
        h, w = h // 2, w // 2
    return n


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
    after_squeeze: Step | None = None,
    split_first: bool = False,
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
        after_squeeze: ``after_squeeze(i, shape) -> layers`` after the squeeze that
            ends scale ``i`` (before its split).
        split_first: factor out before the squeeze instead of after it.
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

        def split(shape: Shape, inner: Callable[[Shape], list[FlowLayer]]) -> FlowLayer:
            c, h, w = shape
            half, kept = (c // 2, h, w), (c - c // 2, h, w)
            split_prior = prior(i, half, kept) if prior is not None else None
            return FactorOut(Sequential(inner(kept)), shape, split_prior)

        def squeeze_then(shape: Shape) -> list[FlowLayer]:
            sq = Squeeze(2)
            squeezed = sq.output_shape(shape)
            mid = after_squeeze(i, squeezed) if after_squeeze is not None else []
            squeezed = Sequential(mid).output_shape(squeezed) if mid else squeezed
            if factor_out and not split_first:
                return [sq, *mid, split(squeezed, lambda kept: [scale(i + 1, kept)])]
            return [sq, *mid, scale(i + 1, squeezed)]

        if factor_out and split_first:
            return Sequential([*body.layers, split(out, squeeze_then)])
        return Sequential([*body.layers, *squeeze_then(out)])

    layers.append(scale(0, shape))
    return layers


def latent_sizes(layers: FlowLayer, shape: Shape) -> list[int]:
    """Sizes of the consecutive parts of the flat latent of a multi-scale flow on
    ``shape``, finest first: one per :class:`FactorOut` (its factored half), then the
    output of the last scale. A flow without factor-out has a single part."""
    sizes: list[int] = []

    def walk(layer: FlowLayer, shape: Shape) -> Shape:
        if isinstance(layer, FactorOut):
            sizes.append(layer.n_out)
            inner = walk(layer.inner, layer.half)
            return (layer.n_out + inner[0],)
        if isinstance(layer, Sequential):
            for sub in layer.layers:
                shape = walk(sub, shape)  # type: ignore[arg-type]
            return shape
        out = layer.output_shape(shape)
        if len(out) == 1 and len(shape) != 1:
            sizes.append(out[0])  # the end of the last scale
        return out

    out = walk(layers, shape)
    if not sizes:
        return [out[0]]
    total = sum(sizes)
    if total != out[0]:  # flat layers after the last flatten (e.g. a fully connected tail)
        sizes[-1] += out[0] - total
    return sizes
