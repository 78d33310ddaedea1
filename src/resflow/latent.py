"""Latent-space tools of the RealNVP paper (Dinh et al. 2017, §5 and Appendix D).

* :func:`manifold_interpolation`: decode the 2-D manifold spanned by the latents of
  four images, ``z = cos(phi) (cos(phi') z1 + sin(phi') z2) + sin(phi) (cos(phi') z3 +
  sin(phi') z4)`` for ``phi, phi'`` in ``[0, pi/2]`` (the corners are the images);
* :func:`conceptual_compression`: keep the coarsest latents of an image and resample
  the finer ones from the prior (in a multi-scale flow the latent's parts are the
  factored halves, finest first: keeping the last part keeps the coarsest scale).

Larger-resolution sampling for fully convolutional flows (Appendix C) needs no tool
of its own: build the same config with a larger ``image_shape`` and load the weights
(``resflow sample --size HxW``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from resflow.flow import Flow
from resflow.models.multiscale import latent_sizes


@torch.no_grad()
def manifold_interpolation(
    model: Flow, images: Tensor, steps: int = 8, labels: Tensor | None = None
) -> Tensor:
    """Decode ``steps x steps`` points of the manifold of four images' latents.

    Args:
        model: the flow (put in eval mode).
        images: ``[4, *model.shape]``.
        steps: points per side (the grid's corners decode the four images).
        labels: for a class-conditional model, the label of every decoded point (one
            label ``[1]`` or ``[steps * steps]``); the four images are encoded with it.

    Returns ``[steps * steps, *model.shape]``, row-major in ``(phi, phi')``.
    """
    if images.shape[0] != 4:
        raise ValueError(f"manifold interpolation needs 4 images, got {images.shape[0]}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    model.eval()
    n = steps * steps
    label4 = None if labels is None else labels.expand(4) if labels.numel() == 1 else labels[:4]
    z, _ = model(images, label4)
    z1, z2, z3, z4 = z
    angle = torch.linspace(0.0, math.pi / 2, steps, dtype=z.dtype, device=z.device)
    phi, phi2 = torch.meshgrid(angle, angle, indexing="ij")
    c, s = phi.cos().reshape(-1, 1), phi.sin().reshape(-1, 1)
    c2, s2 = phi2.cos().reshape(-1, 1), phi2.sin().reshape(-1, 1)
    grid = c * (c2 * z1 + s2 * z2) + s * (c2 * z3 + s2 * z4)
    label_n = None if labels is None else labels.expand(n) if labels.numel() == 1 else labels
    return model.inverse(grid, label_n)


def latent_parts(model: Flow) -> list[int]:
    """Sizes of the consecutive parts of ``model``'s flat latent, finest first."""
    if len(model.latent_shape) != 1:
        return [math.prod(model.latent_shape)]
    return latent_sizes(model.layers, model.shape)


@torch.no_grad()
def conceptual_compression(
    model: Flow, images: Tensor, temperature: float = 1.0, labels: Tensor | None = None
) -> tuple[Tensor, list[float]]:
    """For each image, decode it keeping the coarsest ``k`` latent parts, ``k`` from
    all to one, the finer parts resampled from the prior at ``temperature``.

    Returns ``([n * P, *model.shape], kept fractions)``: row ``i`` holds image ``i``
    reconstructed from all its latents, then from fewer and fewer (``P`` parts).
    """
    model.eval()
    parts = latent_parts(model)
    if len(parts) < 2:
        raise ValueError(
            "conceptual compression needs a multi-scale latent (a flow that factors out "
            "half of its dimensions at each scale); this model has one latent part"
        )
    n = images.shape[0]
    z, _ = model(images, labels)
    ends = torch.tensor(parts).cumsum(0).tolist()
    rows, kept = [], []
    for k in range(len(parts), 0, -1):  # keep the coarsest k parts
        start = ends[-k - 1] if k < len(parts) else 0
        fresh = model.sample_latent(n, temperature, labels)
        zk = torch.cat([fresh[:, :start], z[:, start:]], 1)
        rows.append(model.inverse(zk, labels))
        kept.append((ends[-1] - start) / ends[-1])
    grid = torch.stack(rows, 1).reshape(n * len(parts), *model.shape)
    return grid, kept
