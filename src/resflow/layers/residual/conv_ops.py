"""The stride-1 convolution operators of the Lipschitz layers: the convolution, its
adjoint and its weight gradient, with few-channel and 1x1 kernels run as matrix products
over unfolded patches (``unfold`` / ``fold`` as one gather / scatter-add).

>>> import torch
>>> x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
>>> w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
>>> torch.allclose(conv2d(x, w, None, (1, 1)), torch.nn.functional.conv2d(x, w, padding=1))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Convolutions from or to at most this many channels run as one matrix product over
# unfolded patches: oneDNN's direct kernels reach a small fraction of the matrix units
# there (64x1x28x28 -> 512 channels, 3x3: 2x faster as a product, the adjoint 4x).
_FEW_CHANNELS = 4


def _few(shape: torch.Size | tuple[int, ...], padding: tuple[int, ...]) -> str:
    """Which side of a square k x k (k > 1) kernel of ``shape`` has few channels ("in",
    "out"), or "" where the convolution is left to torch (1x1, unequal or too much
    padding: ``fold`` needs ``padding <= k - 1``)."""
    k = shape[-1]
    if k == 1 or shape[-2] != k or padding[0] != padding[1] or padding[0] > k - 1:
        return ""
    if shape[1] <= _FEW_CHANNELS:
        return "in"
    return "out" if shape[0] <= _FEW_CHANNELS else ""


def _patch_index(c: int, h: int, w: int, k: int, p: int, device: torch.device) -> Tensor:
    """For ``x`` of shape ``(b, c, h, w)`` zero-padded by ``p`` and flattened per sample,
    the positions of its ``k x k`` patches in ``F.unfold``'s order (``(c, ky, kx)`` rows,
    output positions as columns), flattened; cached per shape and device."""
    key = (c, h, w, k, p, str(device))
    idx = _PATCH_INDEX.get(key)
    if idx is None:
        hp, wp = h + 2 * p, w + 2 * p
        ho, wo = hp - k + 1, wp - k + 1
        ar = torch.arange
        idx = (
            ar(c).view(c, 1, 1, 1, 1) * (hp * wp)
            + (ar(ho).view(1, 1, 1, ho, 1) + ar(k).view(1, k, 1, 1, 1)) * wp
            + ar(wo).view(1, 1, 1, 1, wo)
            + ar(k).view(1, 1, k, 1, 1)
        ).reshape(-1)
        idx = idx.to(device)
        if len(_PATCH_INDEX) > 256:
            _PATCH_INDEX.clear()
        _PATCH_INDEX[key] = idx
    return idx


_PATCH_INDEX: dict[tuple[int | str, ...], Tensor] = {}


def unfold(x: Tensor, k: int, p: int) -> Tensor:
    """``F.unfold(x, k, padding=p)`` as one gather from the padded input (faster on a
    CPU at the sizes of the residual blocks' few-channel convolutions)."""
    b, c, h, w = x.shape
    flat = F.pad(x, (p, p, p, p)).reshape(b, -1)
    cols = torch.index_select(flat, 1, _patch_index(c, h, w, k, p, x.device))
    return cols.view(b, c * k * k, -1)


def fold(cols: Tensor, size: tuple[int, int], k: int, p: int) -> Tensor:
    """``F.fold(cols, size, k, padding=p)``, the adjoint of :func:`unfold`: one
    scatter-add into the padded output, then the crop."""
    b = cols.shape[0]
    h, w = size
    c = cols.shape[1] // (k * k)
    hp, wp = h + 2 * p, w + 2 * p
    out = cols.new_zeros(b, c * hp * wp)
    out.index_add_(1, _patch_index(c, h, w, k, p, cols.device), cols.reshape(b, -1))
    return out.view(b, c, hp, wp)[:, :, p : p + h, p : p + w]


def _flipped_taps(y: Tensor, o: int, kk: int) -> Tensor:
    """``y`` of shape ``(b, o * kk, L)`` with its kernel-tap axis reversed."""
    b, _, n = y.shape
    return y.view(b, o, kk, n).flip(2).reshape(b, o * kk, n)


def _taps_weight(w: Tensor) -> Tensor:
    """``w`` (o, c, k, k) as the ``(o * k * k, c)`` matrix of its taps."""
    o, c, k, _ = w.shape
    return w.permute(0, 2, 3, 1).reshape(o * k * k, c)


def conv2d(x: Tensor, w: Tensor, bias: Tensor | None, padding: tuple[int, ...]) -> Tensor:
    """``F.conv2d`` (stride 1), with 1x1 kernels as one batched matrix product, and
    kernels from or to few channels as a product over unfolded patches (faster on CPU):
    few inputs, ``W (o, c k k) @ unfold(x)``; few outputs, the taps ``W' (o k k, c) @ x``
    summed back by ``fold`` with the kernel flipped (``fold`` is ``unfold``'s adjoint)."""
    b, c, h, wd = x.shape
    o, k = w.shape[0], w.shape[-1]
    few = _few(w.shape, padding)
    if w.shape[-1] == 1 and w.shape[-2] == 1:
        y = torch.matmul(w.view(o, c), x.reshape(b, c, h * wd)).view(b, -1, h, wd)
    elif few:
        p = padding[0]
        ho, wo = h + 2 * p - k + 1, wd + 2 * p - k + 1
        if few == "in":
            y = torch.matmul(w.reshape(o, -1), unfold(x, k, p)).view(b, o, ho, wo)
        else:
            taps = torch.matmul(_taps_weight(w), x.reshape(b, c, h * wd))
            y = fold(_flipped_taps(taps, o, k * k), (ho, wo), k, k - 1 - p)
    else:
        return F.conv2d(x, w, bias, padding=padding)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv2d_adjoint(
    u: Tensor, w: Tensor, padding: tuple[int, ...], in_shape: torch.Size | tuple[int, ...]
) -> Tensor:
    """The adjoint of :func:`conv2d` (no bias) applied to ``u``, for inputs shaped like
    ``in_shape`` (batch taken from ``u``): the transposes of :func:`conv2d`'s matrix
    products where it uses them, else the kernel autograd uses for convolution input
    gradients."""
    b, o = u.shape[:2]
    c, k = w.shape[1], w.shape[-1]
    if w.shape[-1] == 1 and w.shape[-2] == 1:
        h, wd = u.shape[-2:]
        return torch.matmul(w.view(o, c).t(), u.reshape(b, o, h * wd)).view(b, -1, h, wd)
    few = _few(w.shape, padding)
    if few:
        p, (h, wd) = padding[0], in_shape[-2:]
        if few == "in":
            cols = torch.matmul(w.reshape(o, -1).t(), u.reshape(b, o, -1))
            return fold(cols, (h, wd), k, p)
        cols = _flipped_taps(unfold(u, k, k - 1 - p), o, k * k)
        return torch.matmul(_taps_weight(w).t(), cols).view(b, c, h, wd)
    shape = (u.shape[0], *in_shape[1:])
    return torch.nn.grad.conv2d_input(shape, w, u, padding=padding)


def conv2d_weight(
    x: Tensor, shape: torch.Size | tuple[int, ...], cot: Tensor, padding: tuple[int, ...]
) -> Tensor:
    """``sum_b`` of the weight gradient of :func:`conv2d` at input ``x`` for the output
    cotangent ``cot`` (``torch.nn.grad.conv2d_weight``, with :func:`conv2d`'s matrix
    products where it uses them)."""
    o, c, k = shape[0], shape[1], shape[-1]
    b = x.shape[0]
    few = _few(shape, padding)
    if few:
        p = padding[0]
        if few == "in":
            cols = unfold(x, k, p)
            return (cot.reshape(b, o, -1) @ cols.transpose(1, 2)).sum(0).view(shape)
        cols = _flipped_taps(unfold(cot, k, k - 1 - p), o, k * k)
        g = (cols @ x.reshape(b, c, -1).transpose(1, 2)).sum(0)
        return g.view(o, k, k, c).permute(0, 3, 1, 2).contiguous()
    return torch.nn.grad.conv2d_weight(x, shape, cot, padding=padding)
