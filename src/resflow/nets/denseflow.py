"""DenseFlow's networks (Grcić, Grubišić & Šegvić, NeurIPS 2021, §2.2).

* :class:`DenseBlock` -- a densely connected block (DenseNet, Huang et al. 2017):
  ``depth`` layers ``conv1x1 -> ReLU -> conv3x3 -> ReLU`` whose ``growth`` output
  channels are appended to their input, then a gated 1x1 convolution
  ``a + b * sigmoid(c)`` to ``out_channels``;
* :func:`nystrom_attention` and :class:`NystromAttention` -- multi-head self-attention
  over the ``H * W`` positions approximated by the Nyström method (Xiong et al. 2021):
  ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with ``m`` landmarks
  ``Q~, K~`` (segment means of the queries and keys); exact when ``m`` is the
  sequence length (``form="textbook"``);
* :func:`authors_nystrom_attention` -- the variant of the DenseFlow authors' code
  (``form="authors"``, the paper presets' default): one head, the convolution's output
  read as ``[H W, 3 E]`` in memory order, the landmarks scaled by ``1/sqrt(H W)``, and
  every softmax over the first of its matrix's two axes;
* :class:`DenseAttentionNet` -- the intra-unit coupling network: ``conv1x1`` to
  ``hidden`` channels, a dense block (local) beside Nyström attention (global), the two
  concatenated and mixed by ``BN -> ReLU -> conv1x1``, then a zero-initialised
  ``conv1x1`` to the coupling's parameters;
* :class:`CrossUnitNet` -- ``g`` of the cross-unit coupling, ``conv3x3 -> ReLU ->
  conv1x1`` (zero at the start) from all previous unit outputs to ``(mu, h)`` of the
  noise;
* :class:`ContextDenseNet` and :func:`dense_context_processor` -- the variational
  dequantizer's conditional coupling network and its features of the data.

Sizes follow the authors' code, so that DenseFlow-74-10 has their parameter count.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from resflow.nets.conditioners import check_context, concat_context


class GatedConv1x1(nn.Module):
    """``a + b * sigmoid(c)`` for ``[a, b, c] = conv1x1(x)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b, c = self.conv(x).chunk(3, 1)
        return a + b * torch.sigmoid(c)


class DenseLayer(nn.Module):
    """``cat([x, ReLU(conv3x3(ReLU(conv1x1(x))))])``: ``growth`` new channels."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(),
            nn.Conv2d(channels, growth, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.net(x)], 1)


class DenseBlock(nn.Module):
    """``depth`` dense layers, then a gated 1x1 convolution to ``out_channels``.

    Arguments:
        in_channels, out_channels: channels of the input and the output.
        depth: dense layers (each appends ``growth`` channels).
        growth: channels each dense layer adds.
        residual: add the input to the output (``out_channels == in_channels``).

    Example:
        >>> block = DenseBlock(4, 6, depth=2, growth=3)
        >>> tuple(block(torch.randn(2, 4, 5, 5)).shape)
        (2, 6, 5, 5)
    """

    def __init__(
        self, in_channels: int, out_channels: int, depth: int, growth: int, residual: bool = False
    ) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(f"a residual dense block keeps its channels: {in_channels} -> "
                             f"{out_channels}")  # fmt: skip
        self.layers = nn.Sequential(
            *(DenseLayer(in_channels + i * growth, growth) for i in range(depth))
        )
        self.out = GatedConv1x1(in_channels + depth * growth, out_channels)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        h = self.out(self.layers(x))
        return x + h if self.residual else h


def _segment_means(n: int, m: int, like: Tensor) -> Tensor:
    """``[m, n]``: row ``j`` averages the ``j``-th of ``m`` contiguous segments of
    ``0..n-1`` (sizes differ by at most one); the identity when ``m == n``."""
    edges = [round(j * n / m) for j in range(m + 1)]
    p = like.new_zeros(m, n)
    for j in range(m):
        p[j, edges[j] : edges[j + 1]] = 1.0 / (edges[j + 1] - edges[j])
    return p


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """Moore--Penrose pseudo-inverse of (a batch of) square matrices by the iteration
    of Razavi et al. (2014) used by Nyströmformer:
    ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from
    ``Z_0 = A^T / (||A||_1 ||A||_inf)``; ``iterations=0``: exact (SVD-based)."""
    if iterations == 0:
        return torch.linalg.pinv(a)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm1 = a.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    norm_inf = a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-1, -2) / (norm1 * norm_inf)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(
    q: Tensor, k: Tensor, v: Tensor, landmarks: int, pinv_iterations: int = 6
) -> Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d)) v`` approximated by the Nyström
    method (Xiong et al. 2021) with ``landmarks`` segment-mean landmarks.

    ``q, k, v``: ``[..., n, d]``. With ``m = min(landmarks, n)`` landmarks ``q~ = P q``,
    ``k~ = P k`` (``P`` averages ``m`` contiguous segments), the result is
    ``softmax(q k~^T) pinv(softmax(q~ k~^T)) softmax(q~ k^T) v`` (scaled by
    ``1/sqrt(d)`` inside each softmax). At ``m = n`` the three kernels are the full
    attention matrix ``S`` and ``S S^+ S = S``: the exact attention.
    """
    n, d = q.shape[-2], q.shape[-1]
    m = min(landmarks, n)
    scale = 1.0 / math.sqrt(d)
    p = _segment_means(n, m, q)
    q_l, k_l = p @ q, p @ k
    kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2) * scale, -1)  # [n, m]
    kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, -1)  # [m, m]
    kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2) * scale, -1)  # [m, n]
    return kernel_1 @ (iterative_pinv(kernel_2, pinv_iterations) @ (kernel_3 @ v))


def authors_nystrom_attention(
    q: Tensor, k: Tensor, v: Tensor, landmarks: int, pinv_iterations: int = 6
) -> Tensor:
    """The Nyström attention of the DenseFlow authors' code, for ``q, k, v`` of shape
    ``[..., n, d]``.

    With ``P`` the ``[m, n]`` segment-mean matrix (``m = min(landmarks, n)``) the
    landmarks are ``q~ = P q / sqrt(n)`` and ``k~ = P k / sqrt(n)`` (scaled by the
    number of positions, not the width, and the full ``q, k`` unscaled), and each kernel
    is normalised over its *first* axis, ``softmax_0(A)_ij = exp(A_ij) / sum_i exp(A_ij)``:

        ``softmax_0(q k~^T) pinv(softmax_0(q~ k~^T)) softmax_0(q~ k^T) v``.

    The pseudo-inverse is :func:`iterative_pinv`. The authors' code needs ``m`` to divide
    ``n`` (equal segments); here uneven segments are allowed (sizes differing by one),
    the same matrix whenever ``m`` divides ``n``.
    """
    n = q.shape[-2]
    m = min(landmarks, n)
    p = _segment_means(n, m, q) / math.sqrt(n)
    q_l, k_l = p @ q, p @ k
    kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), -2)  # [n, m], columns sum to 1
    kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), -2)  # [m, m]
    kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), -2)  # [m, n]
    return kernel_1 @ (iterative_pinv(kernel_2, pinv_iterations) @ (kernel_3 @ v))


class NystromAttention(nn.Module):
    """Nyström self-attention over the positions of ``[B, C, H, W]``.

    ``[q, k, v] = conv1x1(x)`` (``embed`` channels each), the attention plus ``v`` (a
    skip over the attention, as in the authors' code), then ``conv1x1`` back to
    ``channels``. Two forms, with the same parameters:

    * ``"textbook"``: ``heads`` heads of ``embed / heads`` channels, each position's
      query, key and value its channels, :func:`nystrom_attention`; with at least as
      many landmarks as positions the Nyström formula is exact softmax attention, which
      is then computed directly;
    * ``"authors"`` (DenseFlow's code, ``heads`` must be 1): the convolution's output
      ``[3 E, H, W]`` is read in memory order as ``H W`` rows of ``3 E`` numbers, split
      into ``q, k, v`` by columns (so a "position" mixes channels and pixels), then
      :func:`authors_nystrom_attention`, and the ``[H W, E]`` result is read back in
      memory order as ``[E, H, W]``.

    Arguments:
        channels: channels of the input and the output.
        embed: channels of the queries, keys and values (a multiple of ``heads``).
        heads: attention heads (``"textbook"`` only).
        landmarks: Nyström landmarks (at most the number of positions are used).
        pinv_iterations: iterations of the pseudo-inverse (0: exact).
        form: ``"textbook"`` or ``"authors"``.
    """

    def __init__(
        self, channels: int, embed: int, heads: int = 1, landmarks: int = 4,
        pinv_iterations: int = 6, form: str = "textbook",
    ) -> None:  # fmt: skip
        super().__init__()
        if form not in ("textbook", "authors"):
            raise ValueError(f"unknown attention form {form!r}; choose 'textbook' or 'authors'")
        if form == "authors" and heads != 1:
            raise ValueError(f"the authors' Nyström attention has one head, got heads={heads}")
        if embed % heads:
            raise ValueError(f"attention channels {embed} must be a multiple of heads {heads}")
        self.qkv = nn.Conv2d(channels, 3 * embed, 1)
        self.out = nn.Conv2d(embed, channels, 1)
        self.embed, self.heads, self.form = embed, heads, form
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations

    def extra_repr(self) -> str:
        return f"form={self.form}, heads={self.heads}, landmarks={self.landmarks}"

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if self.form == "authors":
            q, k, v = self.qkv(x).reshape(b, h * w, 3 * self.embed).chunk(3, -1)
            att = authors_nystrom_attention(q, k, v, self.landmarks, self.pinv_iterations) + v
            return self.out(att.reshape(b, self.embed, h, w))
        qkv = self.qkv(x).view(b, 3, self.heads, self.embed // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # [B, heads, HW, d] each
        if self.landmarks >= h * w:  # the Nyström formula would be exact: compute it directly
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v + v
        else:
            att = nystrom_attention(q, k, v, self.landmarks, self.pinv_iterations) + v
        return self.out(att.transpose(-1, -2).reshape(b, self.embed, h, w))


class DenseAttentionNet(nn.Module):
    """The intra-unit coupling network of DenseFlow (see the module docstring).

    Arguments:
        in_channels, out_channels: channels of ``x_a`` and of the coupling parameters.
        hidden: channels after the first projection (the paper's 48).
        depth, growth: the dense block (7 layers of 64 channels in the paper).
        heads, landmarks, pinv_iterations, attention: the Nyström attention over
            ``hidden / 2`` channels and its form (:class:`NystromAttention`).
        context_channels: channels of a context (a vector is broadcast over ``H, W``).

    Example:
        >>> net = DenseAttentionNet(2, 4, hidden=8, depth=2, growth=4, heads=2)
        >>> float(net(torch.randn(3, 2, 4, 4)).abs().max())  # zero at the start
        0.0
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 48,
        depth: int = 7,
        growth: int = 64,
        heads: int = 4,
        landmarks: int = 4,
        pinv_iterations: int = 6,
        context_channels: int = 0,
        attention: str = "textbook",
    ) -> None:
        super().__init__()
        self.in_channels, self.context_channels = in_channels, context_channels
        self.project = nn.Conv2d(in_channels + context_channels, hidden, 1)
        self.dense = DenseBlock(hidden, hidden, depth, growth)
        self.attention = NystromAttention(
            hidden, hidden // 2, heads, landmarks, pinv_iterations, attention
        )
        self.mix = nn.Sequential(
            nn.BatchNorm2d(2 * hidden), nn.ReLU(), nn.Conv2d(2 * hidden, hidden, 1, bias=False)
        )
        self.out = nn.Conv2d(hidden, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DenseAttentionNet expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        context = check_context(context, x, self.context_channels, "DenseAttentionNet", True)
        h = self.project(concat_context(x, context))
        h = self.mix(torch.cat([self.attention(h), self.dense(h)], 1))
        return self.out(h)


class CrossUnitNet(nn.Module):
    """``g`` of a cross-unit coupling: ``conv3x3 (to factor x in_channels) -> ReLU ->
    conv1x1`` to ``2 growth`` channels ``(mu, h)``, zero at the start (``mu = 0``,
    ``sigma = 1``)."""

    def __init__(self, in_channels: int, growth: int, factor: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, factor * in_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(factor * in_channels, 2 * growth, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ContextDenseNet(nn.Module):
    """The dequantizer's coupling network: ``cat([x_a, context]) -> conv1x1 -> residual
    dense block -> conv1x1`` (zero at the start).

    Arguments:
        in_channels, out_channels: channels of ``x_a`` and of the coupling parameters.
        context_channels: channels of the (spatial) context, the data's features.
        hidden, depth, growth: width and the dense block (the authors' 64, 4, 64).
    """

    def __init__(
        self, in_channels: int, out_channels: int, context_channels: int = 0, hidden: int = 64,
        depth: int = 4, growth: int = 64,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_channels, self.context_channels = in_channels, context_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + context_channels, hidden, 1),
            DenseBlock(hidden, hidden, depth, growth, residual=True),
            nn.Conv2d(hidden, out_channels, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = check_context(context, x, self.context_channels, "ContextDenseNet", True)
        return self.net(concat_context(x, context))


def dense_context_processor(
    in_channels: int, channels: int = 64, depth: int = 4, growth: int = 16
) -> nn.Sequential:
    """Features of the data for the variational dequantizer, at half the resolution:
    ``dense block -> conv2x2 (stride 2) -> dense block``, ``channels`` each."""
    return nn.Sequential(
        DenseBlock(in_channels, channels, depth, growth),
        nn.Conv2d(channels, channels, 2, stride=2),
        DenseBlock(channels, channels, depth, growth),
    )
