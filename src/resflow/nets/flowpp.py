"""Flow++'s coupling networks (Ho et al. 2019, §3.3): gated convolutions, multi-head
self-attention over spatial positions, layer normalization and dropout.

One coupling network is

    conv3x3 -> blocks x [GatedConv -> LayerNorm -> GatedAttention -> LayerNorm]
    -> conv3x3 (zero at the start),

where, with ``concat_elu(x) = elu([x, -x])`` (PixelCNN++) and ``gate([a, b]) = a *
sigmoid(b)``,

* ``GatedConv(x, ctx) = x + gate(nin(dropout(concat_elu(conv3x3(concat_elu(x)) +
  nin(concat_elu(ctx))))))`` -- the context (the variational dequantizer's features
  of the data, or a class vector) enters every block;
* ``GatedAttention(x) = x + gate(nin(dropout(MHA(nin(x + pos_emb)))))``, multi-head
  dot-product self-attention over the ``H * W`` positions with a learned positional
  embedding shared by the blocks of one network; ``attention=False`` replaces it by
  the paper's no-attention ablation, a pointwise ``max`` of three projections with the
  same number of parameters;
* ``LayerNorm`` normalizes the channels of each position.

``nin`` is a 1x1 convolution. The output's last convolution starts at zero, so a
coupling whose transformer is the identity at zero parameters (the logistic-mixture
CDF, ``Affine("exp")``) starts as the identity. The official code initialises these
layers from data instead (weight-norm style); zero keeps the start deterministic.

:class:`ContextProcessor` is the variational dequantizer's shallow network on the data
(``conv3x3 -> 3 x GatedConv`` with 3x3 convolutions throughout).

References:
    Ho, Chen, Srinivas, Duan & Abbeel (2019), Flow++ (and its TensorFlow code,
    ``flows/flows.py``: ``gated_conv``, ``gated_attn``, ``MixLogisticAttnCoupling``).
    Salimans, Karpathy, Chen & Kingma (2017), PixelCNN++ (gated resnet, concat_elu).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.nets.conditioners import check_context


def concat_elu(x: Tensor) -> Tensor:
    """``elu(cat([x, -x], 1))``: doubles the channels (PixelCNN++)."""
    return F.elu(torch.cat([x, -x], 1))


def gate(x: Tensor) -> Tensor:
    """``a * sigmoid(b)`` for ``[a, b] = x`` split along the channels."""
    a, b = x.chunk(2, 1)
    return a * torch.sigmoid(b)


class ChannelLayerNorm(nn.Module):
    """Layer normalization over the channels of every position of ``[B, C, H, W]``."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class GatedConv(nn.Module):
    """``x + gate(c2(dropout(concat_elu(c1(concat_elu(x)) + a_proj(concat_elu(ctx))))))``.

    Arguments:
        channels: channels of ``x`` (kept).
        context_channels: channels of the context (0: none).
        dropout: dropout probability before the second convolution.
        nin: the second convolution is 1x1 (the couplings) or 3x3 (the context
            processor).
    """

    def __init__(
        self, channels: int, context_channels: int = 0, dropout: float = 0.0, nin: bool = True
    ) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.a_proj = nn.Conv2d(2 * context_channels, channels, 1) if context_channels else None
        k = 1 if nin else 3
        self.c2 = nn.Conv2d(2 * channels, 2 * channels, k, padding=k // 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.c1(concat_elu(x))
        if self.a_proj is not None:
            assert context is not None
            h = h + self.a_proj(concat_elu(context))
        h = self.dropout(concat_elu(h))
        return x + gate(self.c2(h))


class GatedAttention(nn.Module):
    """``x + gate(proj2(dropout(MHA(proj1(x + pos_emb)))))`` over the spatial positions.

    With ``attention=False`` the attention is replaced by Flow++'s ablation: the
    elementwise maximum of three projections (``proj1`` gives ``3 C`` channels, read
    as ``C x 3``), with the same parameters.
    """

    def __init__(
        self, channels: int, heads: int = 4, dropout: float = 0.0, attention: bool = True
    ) -> None:
        super().__init__()
        if attention and channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.attention = attention
        self.proj1 = nn.Conv2d(channels, 3 * channels, 1)
        self.proj2 = nn.Conv2d(channels, 2 * channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.proj1(x + pos_emb)
        if self.attention:
            # [B, 3C, H, W] -> 3 x [B, heads, H*W, C/heads] (channel = (part, head, dim))
            qkv = qkv.view(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
            q, k, v = qkv.unbind(1)
            a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
            out = a.transpose(-1, -2).reshape(b, c, h, w)
        else:
            out = qkv.view(b, c, 3, h, w).amax(2)
        return x + gate(self.proj2(self.dropout(out)))


class FlowppNet(nn.Module):
    """Flow++'s coupling network (see the module docstring).

    Arguments:
        in_channels, out_channels: channels of ``x_a`` and of the output
            (``n_params * C_b`` of the coupling's transformer).
        size: ``(H, W)`` of ``x_a`` (the positional embedding's size).
        hidden: channels of the blocks (Flow++ CIFAR-10: 96).
        blocks: number of ``[GatedConv, LayerNorm, GatedAttention, LayerNorm]`` blocks
            (CIFAR-10: 10; its dequantizer's couplings: 2).
        heads: attention heads (4).
        attention: self-attention, or the pointwise no-attention ablation.
        dropout: dropout probability (CIFAR-10: 0.2).
        context_channels: channels of a context (an image ``[B, k, H, W]`` of ``x_a``'s
            size, or a vector ``[B, k]`` broadcast over the positions); 0: none.

    Example:
        >>> net = FlowppNet(2, 10, size=(4, 4), hidden=8, blocks=1, heads=2)
        >>> float(net(torch.randn(3, 2, 4, 4)).abs().max())
        0.0
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: tuple[int, int],
        hidden: int = 96,
        blocks: int = 10,
        heads: int = 4,
        attention: bool = True,
        dropout: float = 0.0,
        context_channels: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.context_channels = context_channels
        self.size = tuple(size)
        self.pos_emb = nn.Parameter(0.01 * torch.randn(hidden, *self.size))
        self.proj_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.convs = nn.ModuleList(
            GatedConv(hidden, context_channels, dropout) for _ in range(blocks)
        )
        self.attns = nn.ModuleList(
            GatedAttention(hidden, heads, dropout, attention) for _ in range(blocks)
        )
        self.norms = nn.ModuleList(ChannelLayerNorm(hidden) for _ in range(2 * blocks))
        self.proj_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.size:
            raise ValueError(
                f"FlowppNet expects [B, {self.in_channels}, {self.size[0]}, {self.size[1]}], "
                f"got {tuple(x.shape)}"
            )
        context = check_context(context, x, self.context_channels, "FlowppNet", spatial=True)
        if context is not None and context.dim() == 2:
            context = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
        if context is not None:
            context = context.to(x.dtype)
        h = self.proj_in(x)
        for i, (conv, attn) in enumerate(zip(self.convs, self.attns)):
            h = self.norms[2 * i](conv(h, context))
            h = self.norms[2 * i + 1](attn(h, self.pos_emb))
        return self.proj_out(h)


class ContextProcessor(nn.Module):
    """The variational dequantizer's features of the data: ``conv3x3 -> blocks x
    GatedConv`` (3x3 convolutions, no context), ``hidden`` output channels (Flow++:
    32 channels, 3 blocks)."""

    def __init__(
        self, in_channels: int, hidden: int = 32, blocks: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(
            *(GatedConv(hidden, 0, dropout, nin=False) for _ in range(blocks))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.proj(x))
