"""Small coupling, autoregressive and permutation layers for the contract test.

``CASES[name] = (factory, input example shape, context example shape or None)``. Every
factory builds the same shapes (and the same random orders) each call; conditioners
are zero-initialised (the contract test perturbs every parameter before checking).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from resflow.layers.autoregressive import Autoregressive
from resflow.layers.base import FlowLayer
from resflow.layers.coupling import AlternateMask, ChannelMask, CheckerboardMask, Coupling, Mask
from resflow.layers.permutation import Permutation, Reverse
from resflow.layers.transformers import Additive, Affine, Transformer
from resflow.nets.conditioners import MLP, ConvNet
from resflow.nets.made import MADE

Case = tuple[Callable[[], FlowLayer], tuple[int, ...], tuple[int, ...] | None]

TRANSFORMERS: dict[str, Callable[[], Transformer]] = {
    "affine-exp": lambda: Affine("exp"),
    "affine-sigmoid": lambda: Affine("sigmoid"),
    "affine-softplus": lambda: Affine("softplus"),
    "additive": Additive,
}

VECTOR_MASKS: dict[str, Callable[[], Mask]] = {
    "channel": ChannelMask,
    "channel-reversed": partial(ChannelMask, reverse=True),
    "alternate": AlternateMask,
}
IMAGE_MASKS: dict[str, Callable[[], Mask]] = {
    "channel": ChannelMask,
    "checkerboard": CheckerboardMask,
    "checkerboard-reversed": partial(CheckerboardMask, reverse=True),
}

VEC_SHAPE = (5,)
IMG_SHAPE = (3, 4, 4)


def _vector_coupling(mask: str, transformer: str, context: int = 0) -> FlowLayer:
    net = partial(MLP, hidden=(8,), activation="tanh", context_features=context)
    return Coupling.build(VEC_SHAPE, VECTOR_MASKS[mask](), TRANSFORMERS[transformer](), net)


def _image_coupling(mask: str, transformer: str, context: int = 0) -> FlowLayer:
    net = partial(ConvNet, hidden=6, activation="tanh", context_channels=context)
    return Coupling.build(IMG_SHAPE, IMAGE_MASKS[mask](), TRANSFORMERS[transformer](), net)


def _autoregressive(transformer: str, order: str, context: int = 0) -> FlowLayer:
    t = TRANSFORMERS[transformer]()
    made = MADE(4, (12, 12), t.n_params, order=order, seed=3, context_features=context)
    return Autoregressive(made, t)


CASES: dict[str, Case] = {}
for _t in TRANSFORMERS:
    for _m in VECTOR_MASKS:
        CASES[f"coupling-{_m}-{_t}-vec"] = (partial(_vector_coupling, _m, _t), VEC_SHAPE, None)
    for _m in IMAGE_MASKS:
        CASES[f"coupling-{_m}-{_t}-img"] = (partial(_image_coupling, _m, _t), IMG_SHAPE, None)
CASES.update(
    {
        "coupling-channel-affine-exp-vec-context": (
            partial(_vector_coupling, "channel", "affine-exp", 3),
            VEC_SHAPE,
            (3,),
        ),
        "coupling-checkerboard-affine-sigmoid-img-vector-context": (
            partial(_image_coupling, "checkerboard", "affine-sigmoid", 2),
            IMG_SHAPE,
            (2,),
        ),
        "coupling-channel-additive-img-image-context": (
            partial(_image_coupling, "channel", "additive", 1),
            IMG_SHAPE,
            (1, 4, 4),
        ),
        "autoregressive-affine-exp-natural": (
            partial(_autoregressive, "affine-exp", "natural"),
            (4,),
            None,
        ),
        "autoregressive-affine-softplus-random": (
            partial(_autoregressive, "affine-softplus", "random"),
            (4,),
            None,
        ),
        "autoregressive-additive-reversed": (
            partial(_autoregressive, "additive", "reversed"),
            (4,),
            None,
        ),
        "autoregressive-affine-sigmoid-random-context": (
            partial(_autoregressive, "affine-sigmoid", "random", 2),
            (4,),
            (2,),
        ),
        "autoregressive-additive-natural-context": (
            partial(_autoregressive, "additive", "natural", 2),
            (4,),
            (2,),
        ),
        "permutation-random": (lambda: Permutation.random(5, seed=1), (5,), None),
        "permutation-reverse-img": (lambda: Reverse(3), IMG_SHAPE, None),
    }
)
