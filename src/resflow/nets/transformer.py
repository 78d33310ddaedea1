"""A causal transformer over token sequences with a key/value cache (TarFlow's network).

The network is *strictly* autoregressive: its output at position ``t`` depends on the
tokens ``x_0 .. x_{t-1}`` (and the context) only. Its input sequence is shifted by one,
``h_0 = start``, ``h_t = W x_{t-1}`` for ``t >= 1``, plus a learned positional
embedding and, for a class-conditional net, a class embedding added to every position;
then ``depth`` pre-LayerNorm layers

    ``h <- h + Attention(LN(h))``,  ``h <- h + MLP(LN(h))``

with causal self-attention (:func:`torch.nn.functional.scaled_dot_product_attention`,
``is_causal=True``), and a zero-initialised linear output layer after a final LayerNorm,
so that a flow built on it starts at the identity.

:meth:`CausalTransformer.step` computes one position at a time from a
:class:`KVCache` of the keys and values of the positions before it: ``T`` incremental
passes give the same outputs as one full pass (the inverse of an autoregressive flow
needs the outputs one position at a time).

References:
    Vaswani et al. (2017), Attention is all you need.
    Zhai et al. (2025), Normalizing flows are capable generative models (TarFlow, ICML).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.nets.conditioners import check_context


class KVCache:
    """Keys and values of the positions computed so far, one pair per layer.

    Without autograd (sampling) they are written into buffers preallocated for
    ``capacity`` positions; with autograd (a differentiable inverse) they are
    concatenated instead, since in-place writes would invalidate saved tensors.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0  #: positions stored
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v`` (``[B, heads, L, head_dim]``) of ``layer`` at position
        :attr:`length`; return the keys and values of every position up to them."""
        n, new = self.length, k.shape[2]
        if n + new > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions, got {n + new}")
        old_k, old_v = self.keys[layer], self.values[layer]
        if torch.is_grad_enabled():
            keys = k if old_k is None else torch.cat([old_k[:, :, :n], k], 2)
            values = v if old_v is None else torch.cat([old_v[:, :, :n], v], 2)
            self.keys[layer], self.values[layer] = keys, values
            return keys, values
        if old_k is None or old_v is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            old_k, old_v = k.new_empty(shape), v.new_empty(shape)
            self.keys[layer], self.values[layer] = old_k, old_v
        old_k[:, :, n : n + new] = k
        old_v[:, :, n : n + new] = v
        return old_k[:, :, : n + new], old_v[:, :, : n + new]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, causal over the sequence, optionally cached."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the width {width} must be a multiple of the heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        b, length, width = h.shape
        q, k, v = self.qkv(h).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if length != 1 and cache.length:
                raise ValueError("a cached step takes one position at a time")
            k, v = cache.extend(layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))


class TransformerLayer(nn.Module):
    """``h + Attention(LN(h))``, then ``h + MLP(LN(h))`` (pre-LayerNorm)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, h: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        h = h + self.attention(self.norm1(h), cache, layer)
        return h + self.mlp(self.norm2(h))


class CausalTransformer(nn.Module):
    """``[B, T, in_features] -> [B, T, out_features]``, output ``t`` a function of the
    tokens before ``t`` (see the module docstring).

    Arguments:
        in_features: features of a token (``C * p^2`` for patches of size ``p``).
        out_features: outputs per position (``2 * in_features`` for TarFlow's ``alpha, mu``).
        tokens: sequence length ``T`` (the positional embedding is learned per position).
        width: model width ``d``.
        depth: transformer layers.
        heads: attention heads (``width`` must be a multiple).
        mlp_ratio: hidden width of the MLPs, in multiples of ``width``.
        context_features: size of a one-hot class context ``[B, K]`` (0: unconditional;
            an unconditional net ignores a context it is given). The class embedding is
            ``context @ E + (1 - sum(context)) * e_null``: a one-hot row selects its
            class, an all-zero row the learned null class (classifier-free guidance).
        zero_init: zero the output layer.

    Example:
        >>> net = CausalTransformer(4, 8, tokens=6, width=16, depth=1, heads=2, zero_init=False)
        >>> x = torch.randn(3, 6, 4)
        >>> cache = net.new_cache()
        >>> steps = [net.step(x[:, max(t - 1, 0)], cache) for t in range(6)]
        >>> torch.allclose(torch.stack(steps, 1), net(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tokens: int,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        context_features: int = 0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.tokens = in_features, tokens
        self.context_features = context_features
        self.embed = nn.Linear(in_features, width)
        self.start = nn.Parameter(0.02 * torch.randn(width))
        self.position = nn.Parameter(0.02 * torch.randn(tokens, width))
        self.classes: nn.Linear | None = None
        self.null: nn.Parameter | None = None
        if context_features:
            self.classes = nn.Linear(context_features, width, bias=False)
            self.null = nn.Parameter(0.02 * torch.randn(width))
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_features)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _condition(self, context: Tensor | None, x: Tensor) -> Tensor | None:
        """The class embedding ``[B, 1, width]`` (``None`` for an unconditional net)."""
        context = check_context(context, x, self.context_features, "CausalTransformer")
        if context is None or self.classes is None or self.null is None:
            return None
        context = context.to(x.dtype)
        emb = self.classes(context) + (1 - context.sum(1, keepdim=True)) * self.null
        return emb.unsqueeze(1)

    def _output(self, h: Tensor, cache: KVCache | None) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, cache, i)
        return self.head(self.norm(h))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.tokens, self.in_features):
            raise ValueError(
                f"CausalTransformer expects [B, {self.tokens}, {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        start = self.start.expand(x.shape[0], 1, -1)
        h = torch.cat([start, self.embed(x[:, :-1])], 1) + self.position
        cond = self._condition(context, x[:, 0])
        return self._output(h if cond is None else h + cond, None)

    def new_cache(self) -> KVCache:
        """An empty cache for :meth:`step` (one per sequence batch)."""
        return KVCache(len(self.layers), self.tokens)

    def step(self, previous: Tensor, cache: KVCache, context: Tensor | None = None) -> Tensor:
        """The output ``[B, out_features]`` at position ``t = cache.length`` given the
        token ``x_{t-1}`` (``previous``, ``[B, in_features]``; at ``t = 0`` the input is
        the start token and ``previous`` only gives the batch); the cache advances by one."""
        t = cache.length
        if t >= self.tokens:
            raise ValueError(f"all {self.tokens} positions are computed already")
        if previous.dim() != 2 or previous.shape[1] != self.in_features:
            raise ValueError(
                f"step expects the previous token [B, {self.in_features}], "
                f"got {tuple(previous.shape)}"
            )
        h = self.start.expand(previous.shape[0], -1) if t == 0 else self.embed(previous)
        h = (h + self.position[t]).unsqueeze(1)
        cond = self._condition(context, previous)
        out = self._output(h if cond is None else h + cond, cache)
        cache.length += 1
        return out[:, 0]
