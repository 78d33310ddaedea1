"""Activation normalization (Glow, Kingma & Dhariwal 2018).

``y = (x + bias) * exp(log_scale)`` per channel, initialised from the first batch so
that the output has zero mean and unit variance per channel. The initialisation flag
is a buffer, so a loaded checkpoint is never re-initialised. :class:`ElementActNorm`
has a bias and scale per element instead (Flow++'s ``Norm``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer


class _FirstBatchInit(nn.Module):
    """The initialisation flag (a buffer) read on the host until it is seen set, then
    remembered there, so that a forward pass reads no device value; loading a state
    dict forgets it."""

    initialized: Tensor
    _seen_initialized: bool = False

    def _needs_init(self) -> bool:
        if self._seen_initialized:
            return False
        self._seen_initialized = bool(self.initialized)
        return not self._seen_initialized

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._seen_initialized = False
        super()._load_from_state_dict(*args, **kwargs)


class ActNorm(_FirstBatchInit, FlowLayer):
    """Per-channel affine flow with data-dependent initialisation.

    Works on vectors ``[B, C]`` and images ``[B, C, H, W]`` (channel dim 1). The
    logdet is ``sum(log_scale) * H * W`` for images.
    """

    initialized: Tensor

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"ActNorm({self.num_channels}) expects [B, {self.num_channels}, ...], "
                f"got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and scale so that ``x`` maps to zero mean, unit variance per channel."""
        flat = x.transpose(0, 1).reshape(self.num_channels, -1)
        mean = flat.mean(1)
        std = flat.std(1, unbiased=False) if flat.shape[1] > 1 else torch.ones_like(mean)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self._needs_init():
            self.initialize(x)
        y = (x + self._view(self.bias, x)) * self._view(self.log_scale.exp(), x)
        pixels = x[0, 0].numel()
        logdet = self.log_scale.sum() * pixels
        return y, logdet.expand(x.shape[0])

    @torch.no_grad()
    def initialize_inverse(self, y: Tensor) -> None:
        """Set bias and scale so that ``inverse(y)`` has zero mean, unit variance per
        channel (when data first enter in the inverse direction, e.g. in an
        :class:`~resflow.layers.base.Inverse` wrapper)."""
        flat = y.transpose(0, 1).reshape(self.num_channels, -1)
        mean = flat.mean(1)
        std = flat.std(1, unbiased=False) if flat.shape[1] > 1 else torch.ones_like(mean)
        std = std + self.eps
        self.log_scale.copy_(torch.log(std))
        self.bias.copy_(mean / std)
        self.initialized.fill_(True)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        """``x = y exp(-log_scale) - bias``; an uninitialised layer in training mode
        first initialises from ``y`` (:meth:`initialize_inverse`)."""
        self._check(y)
        if self.training and self._needs_init():
            self.initialize_inverse(y)
        return y * self._view((-self.log_scale).exp(), y) - self._view(self.bias, y)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = -self.log_scale.sum() * y[0, 0].numel()
        return self.inverse(y), logdet.expand(y.shape[0])


class ElementActNorm(_FirstBatchInit, FlowLayer):
    """``y = (x + bias) * exp(log_scale)`` with a bias and scale per *element* of an
    example of ``shape``, initialised from the first batch (zero mean and unit variance
    of every element over the batch). Flow++'s ``Norm`` (Ho et al. 2019).
    ``logdet = sum(log_scale)``.
    """

    initialized: Tensor

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-6) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(self.shape))
        self.log_scale = nn.Parameter(torch.zeros(self.shape))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"{self.shape}"

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"ElementActNorm{self.shape} expects [B, {', '.join(map(str, self.shape))}], "
                f"got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean = x.mean(0)
        std = x.std(0, unbiased=False) if len(x) > 1 else torch.ones_like(mean)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self._needs_init():
            self.initialize(x)
        y = (x + self.bias) * self.log_scale.exp()
        return y, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(y)
        return y * (-self.log_scale).exp() - self.bias

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(y), (-self.log_scale.sum()).expand(y.shape[0])
