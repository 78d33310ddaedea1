"""Preprocessing flows for discrete data: dequantization (which owns the ``-D log L``
term of bits/dim), logit / normalize, flips, bit reduction, Gaussian noise
augmentation, and the image pipeline that every image model of resflow starts with."""

from __future__ import annotations

from typing import Literal

from resflow.layers.base import FlowLayer
from resflow.preprocess.bits import ReduceBits, reduce_bits
from resflow.preprocess.dequantize import Dequantize, Dequantizer, UniformDequantizer
from resflow.preprocess.flips import RandomHorizontalFlip
from resflow.preprocess.noise import GaussianNoise
from resflow.preprocess.transforms import LogitTransform, Normalize
from resflow.preprocess.variational import VariationalDequantizer


def image_preprocessing(
    levels: int,
    logit_alpha: float | None = 1e-6,
    horizontal_flip: bool = False,
    dequantizer: Dequantizer | None = None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    noise_std: float = 0.0,
) -> list[FlowLayer]:
    """``Dequantize -> [flip] -> [noise] -> Logit(alpha) | Normalize(mean, std) | nothing``.

    Args:
        levels: quantization levels of the data (256 for 8-bit images).
        logit_alpha: ``alpha`` of the logit transform; ``None`` for no logit.
        horizontal_flip: random left-right flips in training.
        dequantizer: default :class:`UniformDequantizer`.
        normalize: per-channel ``(mean, std)`` instead of the logit transform.
        noise_std: Gaussian noise augmentation of the dequantized data in ``[0, 1)``
            (:class:`GaussianNoise`; 0: none). The model is then one of the noisy data.
    """
    layers: list[FlowLayer] = [dequantizer or UniformDequantizer(levels)]
    if horizontal_flip:
        layers.append(RandomHorizontalFlip())
    if noise_std > 0:
        layers.append(GaussianNoise(noise_std))
    if normalize is not None:
        layers.append(Normalize(*normalize))
    elif logit_alpha is not None:
        layers.append(LogitTransform(logit_alpha))
    return layers


DequantizationKind = Literal["uniform", "variational"]

__all__ = [
    "Dequantize",
    "DequantizationKind",
    "Dequantizer",
    "GaussianNoise",
    "LogitTransform",
    "Normalize",
    "RandomHorizontalFlip",
    "ReduceBits",
    "UniformDequantizer",
    "VariationalDequantizer",
    "image_preprocessing",
    "reduce_bits",
]
