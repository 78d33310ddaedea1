"""Batch normalization as a flow layer (RealNVP, Dinh et al. 2017, §3.7 and Appendix E).

``y = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta`` per channel, with
``log|det dy/dx| = sum_c (log_gamma_c - 1/2 log(var_c + eps)) * H * W``.

In training, ``(mu, var)`` is the *running average including the current batch*:
``mu~_{t+1} = rho mu~_t + (1 - rho) mu^_t`` (the same for ``var``), used at once; the
gradient flows only through the current batch statistics ``mu^_t, var^_t`` (Appendix
E: robust with small minibatches). The first training batch initialises the averages.
In evaluation, and for the inverse in either mode, the stored averages are used, so
``inverse(forward(x)) == x`` also in training mode. As in the paper, the logdet treats
the statistics as constants (the per-example map).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer


class BatchNormFlow(FlowLayer):
    """Per-channel batch normalization with a log-determinant (see the module docstring).

    Arguments:
        num_channels: channels (dim 1) of ``[B, C]`` or ``[B, C, H, W]``.
        momentum: ``rho``, the weight of the stored average (0 uses the batch alone).
        eps: added to the variance.
        affine: learn ``log_gamma`` and ``beta`` after the normalization.
    """

    running_mean: Tensor
    running_var: Tensor
    initialized: Tensor

    def __init__(
        self, num_channels: int, momentum: float = 0.95, eps: float = 1e-4, affine: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_channels = num_channels
        self.momentum = momentum
        self.eps = eps
        self.affine = affine
        if affine:
            self.log_gamma = nn.Parameter(torch.zeros(num_channels))
            self.beta = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, momentum={self.momentum}, eps={self.eps}"

    def _check(self, x: Tensor) -> None:
        if x.dim() not in (2, 4) or x.shape[1] != self.num_channels:
            raise ValueError(
                f"BatchNormFlow({self.num_channels}) expects [B, {self.num_channels}] or "
                f"[B, {self.num_channels}, H, W], got {tuple(x.shape)}"
            )

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    def _statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The ``(mean, var)`` to normalize ``x`` with; updates the averages in training."""
        if not self.training:
            return self.running_mean, self.running_var
        mean, var = self.batch_statistics(x)
        if bool(self.initialized):
            rho = self.momentum
            mean = rho * self.running_mean + (1.0 - rho) * mean
            var = rho * self.running_var + (1.0 - rho) * var
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self.initialized.fill_(True)
        return mean, var

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and (biased) variance of the batch, with their gradients
        (distributed training overrides it to take them over every process's batch)."""
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims)
        return mean, (x - self._view(mean, x)).pow(2).mean(dims)

    def _log_scale(self, var: Tensor) -> Tensor:
        """Per-channel ``log(dy/dx)``."""
        log_scale = -0.5 * torch.log(var + self.eps)
        return log_scale + self.log_gamma if self.affine else log_scale

    def _pixels(self, x: Tensor) -> int:
        return x[0, 0].numel()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        mean, var = self._statistics(x)
        log_scale = self._log_scale(var)
        y = (x - self._view(mean, x)) * self._view(log_scale.exp(), x)
        if self.affine:
            y = y + self._view(self.beta, x)
        logdet = log_scale.sum() * self._pixels(x)
        return y, logdet.expand(x.shape[0])

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y)
        log_scale = self._log_scale(self.running_var)
        if self.affine:
            y = y - self._view(self.beta, y)
        x = y * self._view((-log_scale).exp(), y) + self._view(self.running_mean, y)
        logdet = -log_scale.sum() * self._pixels(y)
        return x, logdet.expand(y.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_logdet(y, context)[0]
