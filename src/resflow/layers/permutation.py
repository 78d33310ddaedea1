"""Fixed permutations of features (or channels): ``y = x[:, perm]``, ``log|det| = 0``.

Put between autoregressive (MAF, Papamakarios et al. 2017) or coupling layers so that
every dimension gets conditioned on the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from resflow.layers.base import FlowLayer, zero_logdet


class Permutation(FlowLayer):
    """``y[:, i] = x[:, perm[i]]`` along dim 1 (vectors ``[B, D]``, images ``[B, C, H, W]``).

    The permutation is a buffer, so it is saved in (and loaded from) the state dict.

    Example:
        >>> layer = Permutation([2, 0, 1])
        >>> layer(torch.tensor([[10.0, 11.0, 12.0]]))[0]
        tensor([[12., 10., 11.]])
    """

    perm: Tensor
    inv_perm: Tensor

    def __init__(self, perm: Sequence[int] | Tensor) -> None:
        super().__init__()
        p = torch.as_tensor(perm, dtype=torch.long).flatten()
        if not torch.equal(torch.sort(p).values, torch.arange(len(p))):
            raise ValueError(f"perm must be a permutation of 0..{len(p) - 1}, got {p.tolist()}")
        self.register_buffer("perm", p)
        self.register_buffer("inv_perm", torch.argsort(p))

    @classmethod
    def random(cls, num_features: int, seed: int = 0) -> Permutation:
        """A uniformly random permutation drawn from its own generator seeded by ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randperm(num_features, generator=gen))

    def extra_repr(self) -> str:
        return f"num_features={len(self.perm)}"

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != len(self.perm):
            raise ValueError(
                f"{type(self).__name__}({len(self.perm)}) expects [B, {len(self.perm)}, ...], "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        return x.index_select(1, self.perm), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(y)
        return y.index_select(1, self.inv_perm)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(y, context), zero_logdet(y)


class Reverse(Permutation):
    """Reverse the order of dim 1: ``y[:, i] = x[:, D - 1 - i]``."""

    def __init__(self, num_features: int) -> None:
        super().__init__(torch.arange(num_features - 1, -1, -1))
