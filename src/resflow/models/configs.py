"""The config bases every model family builds on, and the limits they share.

A family's config derives from :class:`ImageModelConfig` (integer images ``[C, H, W]``)
or :class:`VectorModelConfig` (real vectors ``[D]``), adding
:class:`ClassConditionalConfig` when it has a class-conditional form, and declares only
the fields that are its own. The registry, the trainer and the command line ask these
bases what a config is (:func:`is_image_config`, :func:`is_class_conditional`); nothing
recognises a config by its field names. A family may re-declare a shared field to give
it another default (a field keeps its place in the base's order).

>>> from dataclasses import dataclass
>>> from resflow.config import param
>>> @dataclass
... class MyImageConfig(ImageModelConfig, ClassConditionalConfig):
...     width: int = param(64, ge=1, le=MAX_WIDTH, help="channels")
>>> cfg = MyImageConfig(image_shape=(1, 8, 8), levels=17)
>>> is_image_config(cfg), is_class_conditional(cfg), cfg.horizontal_flip
(True, True, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resflow.config import Config, param
from resflow.models.dequantization import DequantizationConfig
from resflow.models.limits import MAX_CLASSES, MAX_LEVELS, MAX_SIDE, MAX_WIDTH

__all__ = [
    "MAX_CLASSES",
    "MAX_LEVELS",
    "MAX_SIDE",
    "MAX_WIDTH",
    "ClassConditionalConfig",
    "ImageModelConfig",
    "VectorModelConfig",
    "is_class_conditional",
    "is_image_config",
    "is_vector_config",
]


@dataclass
class ImageModelConfig(Config):
    """What every image family's config holds: the data's shape and quantization, the
    training-time flips and the dequantizer."""

    image_shape: tuple[int, int, int] = param((3, 32, 32), ge=1, le=MAX_SIDE, help="(C, H, W)")
    levels: int = param(256, ge=2, le=MAX_LEVELS, help="quantization levels of the data")
    horizontal_flip: bool = param(False, help="random horizontal flips in training")
    dequantization: DequantizationConfig = field(default_factory=DequantizationConfig)


@dataclass
class ClassConditionalConfig(Config):
    """The field of a family with a class-conditional form (``--conditional`` sets it
    from the data's labels)."""

    n_classes: int = param(0, ge=0, le=MAX_CLASSES, help="classes (0: unconditional)")


@dataclass
class VectorModelConfig(Config):
    """What every vector family's config holds: the data's dimension and the size of a
    continuous context it is conditioned on (``log p(x | c)``, ``sample(n, context=c)``)."""

    dim: int = param(2, ge=1, le=1_000_000, help="data dimension")
    context_features: int = param(
        0, ge=0, le=MAX_WIDTH, help="size of a continuous context vector (0: unconditional)"
    )


def is_image_config(config: Any) -> bool:
    """Whether ``config`` is the config of an image model."""
    return isinstance(config, ImageModelConfig)


def is_vector_config(config: Any) -> bool:
    """Whether ``config`` is the config of a vector model."""
    return isinstance(config, VectorModelConfig)


def is_class_conditional(config: Any) -> bool:
    """Whether the family of ``config`` has a class-conditional form."""
    return isinstance(config, ClassConditionalConfig)
