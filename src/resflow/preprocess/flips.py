"""Random horizontal flips as a flow layer (a data augmentation, logdet 0)."""

from __future__ import annotations

import torch
from torch import Tensor

from resflow.layers.base import FlowLayer, zero_logdet


class RandomHorizontalFlip(FlowLayer):
    """Flip each image left-right with probability ``p`` in training mode only.

    A permutation, so logdet 0; the identity in eval mode and in ``inverse``
    (CIFAR-10 and CelebA in RealNVP, Glow and Residual Flows).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and self.p > 0:
            flip = torch.rand(x.shape[0], device=x.device) < self.p
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return y
