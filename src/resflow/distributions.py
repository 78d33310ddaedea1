"""Base distributions of flows.

Each takes an optional ``context`` in ``log_prob(z, context)`` and
``sample(n, temperature, context)``: the unconditional ones ignore it; the
class-conditional one expects a one-hot label ``[B, K]`` (a :class:`~resflow.flow.Flow`
with ``n_classes`` turns class indices into one-hot vectors before calling it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def _gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    eps = (z - mean) * torch.exp(-log_std)
    return (-0.5 * (eps.pow(2) + LOG_2PI) - log_std).flatten(1).sum(1)


class StandardNormal(nn.Module):
    """``N(0, I)`` over tensors of a fixed event ``shape``; ``log_prob`` sums all dims."""

    def __init__(self, shape: tuple[int, ...] | int) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return -0.5 * (z.pow(2) + LOG_2PI).flatten(1).sum(1)

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        a = self._anchor
        return temperature * torch.randn(n, *self.shape, device=a.device, dtype=a.dtype)


class DiagonalNormal(nn.Module):
    """``N(mu, diag(sigma^2))`` with learned ``mu`` and ``log sigma`` per element
    (i-ResNet's prior); ``sample`` scales the noise by ``temperature``."""

    def __init__(self, shape: tuple[int, ...] | int) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.mean = nn.Parameter(torch.zeros(self.shape))
        self.log_std = nn.Parameter(torch.zeros(self.shape))

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return _gaussian_log_prob(z, self.mean, self.log_std)

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        eps = torch.randn(n, *self.shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * eps * torch.exp(self.log_std)


class ClassConditionalNormal(nn.Module):
    """``N(mu_y, diag(sigma_y^2))``: one learned mean and scale per class and element,
    selected by a one-hot label ``[B, K]`` (Glow's class-conditional prior, Kingma &
    Dhariwal 2018, §5: the prior's parameters are a linear function of the one-hot
    label). Both start at zero: the standard normal for every class."""

    def __init__(self, shape: tuple[int, ...] | int, n_classes: int) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a class-conditional prior needs >= 2 classes, got {n_classes}")
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.n_classes = n_classes
        self.mean = nn.Parameter(torch.zeros(n_classes, *self.shape))
        self.log_std = nn.Parameter(torch.zeros(n_classes, *self.shape))

    def _params(self, context: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
        if context is None or context.shape != (n, self.n_classes):
            got = "none" if context is None else tuple(context.shape)
            raise ValueError(
                f"the class-conditional prior needs one-hot labels [{n}, {self.n_classes}], "
                f"got {got}"
            )
        onehot = context.to(self.mean.dtype)
        mean = (onehot @ self.mean.flatten(1)).view(n, *self.shape)
        log_std = (onehot @ self.log_std.flatten(1)).view(n, *self.shape)
        return mean, log_std

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return _gaussian_log_prob(z, *self._params(context, z.shape[0]))

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        mean, log_std = self._params(context, n)
        return mean + temperature * torch.randn_like(mean) * torch.exp(log_std)


def make_base(shape: tuple[int, ...], prior: str = "standard", n_classes: int = 0) -> nn.Module:
    """The base distribution a model config names: ``"standard"`` (``N(0, I)``) or
    ``"diagonal"`` (learned), class-conditional when ``n_classes > 0``."""
    if n_classes:
        return ClassConditionalNormal(shape, n_classes)
    if prior == "diagonal":
        return DiagonalNormal(shape)
    if prior == "standard":
        return StandardNormal(shape)
    raise ValueError(f"unknown prior {prior!r}; choose 'standard' or 'diagonal'")
