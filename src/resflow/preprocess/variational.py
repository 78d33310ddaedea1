"""Variational dequantization (Flow++, Ho et al. 2019, §3.1).

The noise ``u`` in ``y = (x + u) / L`` is drawn from a learned conditional density
``q(u | x)`` on ``[0, 1)^D`` instead of the uniform one:

    eps ~ base,   h = g(eps; features(x)),   u = sigmoid(h),

with ``g`` an invertible flow conditioned on features of ``x`` (its layers receive
them as their ``context``). By the change of variables

    log q(u | x) = log p_base(eps) - log|det dg/deps| - sum log sigmoid'(h),

and the dequantizer's logdet is ``-D log L - log q(u | x)`` (see
:mod:`resflow.preprocess.dequantize`), so maximum likelihood on the dequantized data
maximizes ``E_q[log p(x + u) - log q(u | x)]``, a lower bound on the discrete
``log P(x)`` that is tight when ``q(u | x)`` is the model's own posterior over the
bin. Model and dequantizer are trained jointly by the usual objective.

The base is ``N(0, I)`` (Flow++) or the standard logistic (``eps = logit(u0)``, ``u0``
uniform); with the logistic base and an identity ``g`` the dequantizer *is* uniform
dequantization (``u = u0``, ``log q = 0``), the special case it generalizes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.layers.base import FlowLayer
from resflow.preprocess.dequantize import Dequantizer

Base = Literal["normal", "logistic"]
_LOG_2PI = math.log(2 * math.pi)


def _sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


class VariationalDequantizer(Dequantizer):
    """``u = sigmoid(flow(eps; processor(x / L - 1/2)))`` (see the module docstring).

    Arguments:
        levels: quantization levels ``L``.
        flow: an invertible layer on noise shaped like ``x``; it receives the
            processor's features as its ``context``.
        processor: network from the scaled data ``x / L - 1/2`` to the features (any
            module; ``None``: the scaled data themselves).
        base: ``"normal"`` (Flow++) or ``"logistic"``.

    Example:
        >>> from resflow.layers.base import Sequential
        >>> deq = VariationalDequantizer(4, Sequential(), base="logistic")
        >>> y, logdet = deq(torch.tensor([[0.0, 3.0]]))  # the identity flow: uniform
        >>> bool(((y >= 0) & (y < 1)).all()), round(float(logdet), 4) == round(-2 * math.log(4), 4)
        (True, True)
    """

    def __init__(
        self,
        levels: int,
        flow: FlowLayer,
        processor: nn.Module | None = None,
        base: Base = "normal",
    ) -> None:
        super().__init__(levels)
        if base not in ("normal", "logistic"):
            raise ValueError(f"unknown base {base!r}; choose 'normal' or 'logistic'")
        self.flow = flow
        self.processor = processor
        self.base = base

    def extra_repr(self) -> str:
        return f"levels={self.levels}, base={self.base!r}"

    def features(self, x: Tensor) -> Tensor:
        """The context of the noise flow: ``processor(x / L - 1/2)``."""
        scaled = x / self.levels - 0.5
        return scaled if self.processor is None else self.processor(scaled)

    def sample_base(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, log p_base(eps))`` per sample."""
        if self.base == "normal":
            eps = torch.randn_like(x)
            return eps, _sum(-0.5 * (eps.pow(2) + _LOG_2PI))
        # rand draws k * eps/2 in [0, 1); 0 (once per 2**24 float32 draws) would give
        # eps = -inf: it stands for the first cell [0, eps/2), drawn at its midpoint
        tiny = torch.finfo(x.dtype).eps / 4
        u0 = torch.rand_like(x).clamp(tiny, 1.0 - 2 * tiny)
        eps = torch.log(u0) - torch.log1p(-u0)
        return eps, _sum(F.logsigmoid(eps) + F.logsigmoid(-eps))

    def noise(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        eps, log_base = self.sample_base(x)
        h, logdet = self.flow(eps, self.features(x))
        log_dsigmoid = _sum(F.logsigmoid(h) + F.logsigmoid(-h))
        u = torch.sigmoid(h)
        # u < 1 where sigmoid rounds to 1 (x + u is kept in x's bin by Dequantizer.in_bin)
        u = u.clamp(max=1.0 - torch.finfo(u.dtype).eps / 2)
        return u, log_base - logdet - log_dsigmoid
