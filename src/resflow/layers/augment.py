"""Noise augmentation and DenseFlow's cross-unit coupling (Grcić et al., NeurIPS 2021, §2.1).

A flow can model data in a space of *more* dimensions than the data by appending
noise ``e ~ N(0, I)`` to an intermediate representation ``z``. DenseFlow transforms
the noise by an affine map whose parameters come from earlier representations:

    z_aug = [z, sigma * e + mu],   (mu, log sigma) = g(condition),

and, the map ``(z, e) -> z_aug`` having Jacobian ``diag(I, sigma)``,

    log p(z) >= E_e[ log p(z_aug) - log N(e; 0, I) + sum log sigma ]   (eq. 9).

:class:`NoiseAugmentation` is this map. It is a *stochastic layer* (see
:mod:`resflow.layers.base`): its logdet is ``sum log sigma - log N(e)``, so a model's
``log p_base(f(x)) + sum(logdets)`` is a single-sample estimate of the lower bound,
``K`` of them give the importance-weighted bound
(:func:`resflow.evaluation.evaluate_bounds`), and its inverse drops the noise
channels. ``log sigma = c * tanh(h / c)`` is soft-clamped to ``(-c, c)`` (``c = 2``).

:class:`DenseAugmentedBlock` is a DenseFlow block: units ``f_1 .. f_M`` (each a few
invertible modules) with a cross-unit coupling after every unit but the last, whose
``g`` sees *all* previous representations ``z_<i = [z_0, .., z_{i-1}]`` (``z_0`` the
block's input, ``z_j`` the output of unit ``j``): every unit works on ``growth`` more
channels than the one before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer, Shape, is_stochastic, zero_logdet

_LOG_2PI = math.log(2 * math.pi)


def _sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def standard_normal_log_prob(e: Tensor) -> Tensor:
    """``log N(e; 0, I)`` per sample."""
    return _sum(-0.5 * (e.pow(2) + _LOG_2PI))


class NoiseAugmentation(FlowLayer):
    """Append ``growth`` channels ``sigma * e + mu``, ``e ~ N(0, I)`` (see the module
    docstring).

    Arguments:
        growth: channels (or features) of noise appended along dim 1.
        net: maps the condition to ``2 * growth`` channels ``(mu, h)`` with
            ``log sigma = max_log_scale * tanh(h / max_log_scale)``; ``None``: ``mu = 0``,
            ``sigma = 1`` (plain augmentation).
        max_log_scale: the soft bound ``c`` of ``|log sigma|``.

    As a layer (``forward``), the condition is the layer's own input; a
    :class:`DenseAugmentedBlock` conditions it on earlier representations through
    :meth:`augment`. Works on vectors ``[B, D]`` and images ``[B, C, H, W]``.

    Example:
        >>> aug = NoiseAugmentation(2)
        >>> y, logdet = aug(torch.randn(3, 4))
        >>> tuple(y.shape), torch.allclose(logdet, -standard_normal_log_prob(y[:, 4:]))
        ((3, 6), True)
    """

    stochastic = True

    def __init__(
        self, growth: int, net: nn.Module | None = None, max_log_scale: float = 2.0
    ) -> None:
        super().__init__()
        if growth < 1:
            raise ValueError(f"growth must be >= 1, got {growth}")
        if not max_log_scale > 0:
            raise ValueError(f"max_log_scale must be positive, got {max_log_scale}")
        self.growth = growth
        self.net = net
        self.max_log_scale = max_log_scale

    def extra_repr(self) -> str:
        return f"growth={self.growth}"

    def params(self, condition: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log sigma)`` for the noise appended to ``like``, from ``condition``."""
        if self.net is None:
            zeros = like.new_zeros(like.shape[0], self.growth, *like.shape[2:])
            return zeros, zeros
        out = self.net(condition)
        expected = (like.shape[0], 2 * self.growth, *like.shape[2:])
        if tuple(out.shape) != expected:
            raise ValueError(
                f"the augmentation net returned shape {tuple(out.shape)}, expected {expected}"
            )
        mu, h = out.chunk(2, 1)
        c = self.max_log_scale
        return mu, c * torch.tanh(h / c)

    def augment(
        self, x: Tensor, condition: Tensor, e: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``([x, sigma * e + mu], sum log sigma - log N(e))`` with a fresh ``e ~ N(0, I)``
        (or the given one)."""
        mu, log_sigma = self.params(condition, x)
        if e is None:
            e = torch.randn_like(mu)
        elif e.shape != mu.shape:
            raise ValueError(f"expected noise of shape {tuple(mu.shape)}, got {tuple(e.shape)}")
        y = torch.cat([x, mu + log_sigma.exp() * e], 1)
        return y, _sum(log_sigma) - standard_normal_log_prob(e)

    def split(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, noise channels)`` of an augmented ``y``."""
        if y.dim() < 2 or y.shape[1] <= self.growth:
            raise ValueError(
                f"expected more than {self.growth} channels to drop, got shape {tuple(y.shape)}"
            )
        return y[:, : -self.growth], y[:, -self.growth :]

    def noise_logdet(self, noise: Tensor, condition: Tensor, like: Tensor) -> Tensor:
        """The forward term ``sum log sigma - log N(e)`` of the ``noise`` channels, with
        ``e = (noise - mu) / sigma`` recovered from the condition."""
        mu, log_sigma = self.params(condition, like)
        e = (noise - mu) * torch.exp(-log_sigma)
        return _sum(log_sigma) - standard_normal_log_prob(e)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.augment(x, x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.split(y)[0]

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, noise = self.split(y)
        return x, -self.noise_logdet(noise, x, x)

    def output_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[0] + self.growth, *input_shape[1:])


class DenseAugmentedBlock(FlowLayer):
    """A DenseFlow block: ``unit_0 -> h_0 -> unit_1 -> h_1 -> ... -> unit_{M-1}``.

    ``h_i`` (a :class:`NoiseAugmentation`) appends noise to the output ``z_{i+1}`` of
    unit ``i``, its ``g`` applied to ``cat([z_0, .., z_i])`` (the block's input and the
    outputs of the units before ``i``, each without its noise), as in the authors'
    code. The logdet sums the units' and the couplings' (stochastic) terms; the inverse
    drops each unit's noise. ``inverse_and_logdet`` recovers the noise ``e`` of the
    inverted point (its ``g`` sees the reconstructed representations), so it returns
    minus the forward term exactly.

    Arguments:
        units: ``M`` layers; unit ``i`` must map its input shape to itself.
        augmentations: ``M - 1`` :class:`NoiseAugmentation` layers.
    """

    def __init__(self, units: Sequence[FlowLayer], augmentations: Sequence[NoiseAugmentation]):
        super().__init__()
        if len(units) < 1 or len(augmentations) != len(units) - 1:
            raise ValueError(
                f"a block of {len(units)} units needs {max(len(units) - 1, 0)} augmentations, "
                f"got {len(augmentations)}"
            )
        self.units = nn.ModuleList(units)
        self.augmentations = nn.ModuleList(augmentations)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return len(self.augmentations) > 0 or any(is_stochastic(u) for u in self.units)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        history = [x]
        logdet = zero_logdet(x)
        z = x
        for i, unit in enumerate(self.units):
            z, ld = unit(z, context)
            logdet = logdet + ld
            if i < len(self.augmentations):
                condition = torch.cat(history, 1)
                history.append(z)
                z, ld = self.augmentations[i].augment(z, condition)  # type: ignore[operator]
                logdet = logdet + ld
        return z, logdet

    def _invert(
        self, y: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """``(x, sum of the units' inverse logdets, the units' outputs without their
        noise, the noise channels)``, one output and noise per coupling."""
        logdet = zero_logdet(y)
        outputs: list[Tensor] = []
        noises: list[Tensor] = []
        z = y
        for i in reversed(range(len(self.units))):
            if i < len(self.augmentations):
                z, noise = self.augmentations[i].split(z)  # type: ignore[operator]
                outputs.insert(0, z)
                noises.insert(0, noise)
            z, ld = self.units[i].inverse_and_logdet(z, context)  # type: ignore[operator]
            logdet = logdet + ld
        return z, logdet, outputs, noises

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        z = y
        for i in reversed(range(len(self.units))):
            if i < len(self.augmentations):
                z = self.augmentations[i].inverse(z)
            z = self.units[i].inverse(z, context)
        return z

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logdet, outputs, noises = self._invert(y, context)
        for i, (out, noise) in enumerate(zip(outputs, noises)):
            condition = torch.cat([x, *outputs[:i]], 1)
            aug = self.augmentations[i]
            logdet = logdet - aug.noise_logdet(noise, condition, out)  # type: ignore[operator]
        return x, logdet

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        for i, unit in enumerate(self.units):
            out = unit.output_shape(shape)  # type: ignore[operator]
            if out != shape:
                raise ValueError(f"unit {i} of a dense block changes its shape {shape} -> {out}")
            if i < len(self.augmentations):
                shape = self.augmentations[i].output_shape(shape)  # type: ignore[operator]
        return shape
