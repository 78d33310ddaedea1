"""TarFlow's block: an affine autoregressive flow over a sequence of tokens, its
parameters predicted by a causal transformer (Zhai et al. 2025).

For tokens ``x_0 .. x_{T-1}`` (``[B, T, D]``, e.g. image patches from
:class:`~resflow.layers.patch.Patchify`) and a strictly causal network giving
``(alpha_t, mu_t)`` from ``x_<t`` (:class:`~resflow.nets.transformer.CausalTransformer`):

    ``z_t = (x_t - mu_t(x_<t)) * exp(-alpha_t(x_<t))``,
    ``log|det dz/dx| = -sum_t sum_d alpha_{t,d}``.

The Jacobian is block lower-triangular in token order (``D x D`` diagonal blocks
``diag(exp(-alpha_t))``), so density evaluation is one parallel pass. A block with
``flip=True`` works on the reversed sequence (and reverses its output back): its
Jacobian is block *upper*-triangular. Alternating blocks lets every token condition on
every other across the stack.

The inverse goes token by token, ``x_t = z_t * exp(alpha_t) + mu_t``. With the cache
(the default) the network runs one incremental pass per token, keeping the attention
keys and values of the tokens already found (:class:`~resflow.nets.transformer.KVCache`):
``T`` single-position passes per block. :meth:`TarFlowBlock.inverse_uncached` reruns
the full network ``T`` times (the reference the cached inverse is tested against).

A class-conditional block takes one-hot labels as ``context``; with a guidance weight
set (:func:`resflow.layers.guidance.guidance`) it uses the guided ``alpha`` and ``mu``
in both directions.

References:
    Zhai et al. (2025), Normalizing flows are capable generative models (TarFlow,
    ICML 2025).
    Papamakarios, Pavlakou & Murray (2017), Masked autoregressive flow for density
    estimation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from resflow.layers.base import FlowLayer
from resflow.layers.guidance import guided


class TarFlowBlock(FlowLayer):
    """``z_t = (x_t - mu_t) * exp(-alpha_t)`` on token sequences ``[B, T, D]``.

    Arguments:
        net: a strictly causal network ``net(x, context) -> [B, T, 2 D]`` (``alpha``
            then ``mu`` per token, output ``t`` a function of ``x_<t``) with
            ``net.new_cache()`` and ``net.step(x_prev, cache, context) -> [B, 2 D]``.
        flip: work on the reversed token order.

    Attributes:
        guidance: classifier-free guidance weight (``None``: none; see
            :mod:`resflow.layers.guidance`).
        use_cache: invert with the key/value cache (``False``: :meth:`inverse_uncached`).

    Example:
        >>> from resflow.nets.transformer import CausalTransformer
        >>> block = TarFlowBlock(CausalTransformer(3, 6, tokens=5, width=16, depth=1,
        ...                                        heads=2, zero_init=False), flip=True)
        >>> x = torch.randn(4, 5, 3)
        >>> z, logdet = block(x)
        >>> torch.allclose(block.inverse(z), x, atol=1e-5)
        True
    """

    def __init__(self, net: nn.Module, flip: bool = False) -> None:
        super().__init__()
        self.net = net
        self.flip = flip
        self.guidance: float | None = None
        self.use_cache = True

    def extra_repr(self) -> str:
        return f"flip={self.flip}"

    def _order(self, x: Tensor) -> Tensor:
        return x.flip(1) if self.flip else x

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"TarFlowBlock expects tokens [B, T, D], got {tuple(x.shape)}")

    def params(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(alpha, mu)``, each ``[B, T, D]``, for tokens ``x`` in the block's own
        order (guided when :attr:`guidance` is set)."""
        out = guided(self.net, x, context, self.guidance)
        alpha, mu = out.chunk(2, -1)
        return alpha, mu

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        x = self._order(x)
        alpha, mu = self.params(x, context)
        z = (x - mu) * torch.exp(-alpha)
        return self._order(z), -alpha.sum((1, 2))

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token by token (cached unless :attr:`use_cache` is off): ``x_t = z_t
        exp(alpha_t) + mu_t`` and ``log|det dx/dz| = sum alpha``."""
        if not self.use_cache:
            return self.inverse_uncached(y, context)
        self._check(y)
        z = self._order(y)
        cache = self.net.new_cache()  # type: ignore[operator]
        previous = torch.zeros_like(z[:, 0])
        tokens, logdet = [], z.new_zeros(z.shape[0])

        def step(x_prev: Tensor, ctx: Tensor | None) -> Tensor:
            return self.net.step(x_prev, cache, ctx)  # type: ignore[operator]

        for t in range(z.shape[1]):
            alpha, mu = guided(step, previous, context, self.guidance).chunk(2, -1)
            previous = z[:, t] * torch.exp(alpha) + mu
            tokens.append(previous)
            logdet = logdet + alpha.sum(1)
        return self._order(torch.stack(tokens, 1)), logdet

    def inverse_uncached(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The inverse without a cache: ``T`` full passes of the network, pass ``t``
        fixing token ``t`` (whose parameters depend on the tokens before it only)."""
        self._check(y)
        z = self._order(y)
        n_tokens = z.shape[1]
        x = torch.zeros_like(z)
        logdet = z.new_zeros(z.shape[0])
        for t in range(n_tokens):
            alpha, mu = self.params(x, context)
            x_t = z[:, t : t + 1] * torch.exp(alpha[:, t : t + 1]) + mu[:, t : t + 1]
            x = torch.cat([x[:, :t], x_t, x[:, t + 1 :]], 1)
            logdet = logdet + alpha[:, t].sum(1)
        return self._order(x), logdet

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_logdet(y, context)[0]


@contextmanager
def without_cache(model: nn.Module) -> Iterator[None]:
    """Invert every :class:`TarFlowBlock` of ``model`` without the key/value cache
    inside the ``with`` block (for timing and checking the cached inverse)."""
    blocks = [m for m in model.modules() if isinstance(m, TarFlowBlock)]
    saved = [b.use_cache for b in blocks]
    try:
        for b in blocks:
            b.use_cache = False
        yield
    finally:
        for b, used in zip(blocks, saved):
            b.use_cache = used
