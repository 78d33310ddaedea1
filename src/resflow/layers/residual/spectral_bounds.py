"""Certified upper bounds on the 2-norm (spectral norm) of dense and convolution
operators, and the Cholesky test that confirms a guessed bound.

A power iteration only ever gives a *lower* bound on ``||W||``; rescaling a weight by a
lower bound does not make it contractive. This module gives the matching upper bounds
used by :mod:`resflow.layers.residual.spectral` to certify ``||W||_2 <= c`` (mixed
norms ``p -> q``: :mod:`resflow.layers.residual.mixed_norms`).

**Dense.** ``sigma_max(W)`` exactly: the largest eigenvalue of the smaller Gram
matrix (``W^T W`` or ``W W^T``) by a symmetric eigensolver in float64 (backward
stable: the computed eigenvalue is within ``O(n eps) ||G||`` of the true one), with a
relative margin :data:`MARGIN` that covers that rounding.

**Convolution** (stride 1, zero padding ``p``, input ``C x H x W``). With ``A``
the operator on the actual input shape:

* *exact* when the smaller Gram matrix of ``A`` has at most :data:`EXACT_LIMIT` rows:
  ``G = A^T A = sum_y P_y^T M P_y`` (``P_y`` extracts the patch that output pixel ``y``
  reads, ``M = K^T K`` is the Gram matrix of the kernel reshaped to
  ``C_out x C_in k^2``), assembled without forming ``A`` (:func:`conv_gram`);
* *bounded* above by the circular convolution on a larger grid otherwise
  (:func:`circular_conv_norm`). In 1-D, the zero-padded convolution reads input
  indices ``-p .. n + p - 1`` for its ``n_out = n + 2p - k + 1`` outputs; on the
  cyclic group ``Z_N`` with ``N >= max(n + p, n_out)`` and the input embedded with
  zeros in ``n .. N - 1``, the indices ``-p .. -1`` wrap onto ``N - p .. N - 1 >= n``
  (zeros) and ``n .. n + p - 1 < N`` are zeros too, so the first ``n_out`` outputs of
  the circular convolution equal the zero-padded ones: ``A = R C_N E`` with ``E`` an
  isometric embedding and ``R`` a coordinate restriction, hence
  ``||A|| <= ||C_N|| = max_w sigma_max(K^(w))`` over the ``N_h N_w`` DFT frequencies
  (we also take ``N >= k``, so that the kernel fits the grid)
  (Sedghi et al., ICLR 2019, for the circular case). Per axis in 2-D.
  For 3x3 kernels with padding 1 this is ``N = n + 1``; the bound is loose by a few
  percent on small images, which is why small operators are done exactly.

>>> import torch
>>> float(spectral_norm(torch.diag(torch.tensor([3.0, 1.0])))) >= 3.0
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

EXACT_LIMIT = 4096
"""Largest Gram matrix (rows) of a convolution whose norm is computed exactly."""
MARGIN = 1e-8
"""Relative margin for the float64 rounding of the Gram matrix and its eigensolver."""


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small dense factorizations on one thread: multi-threaded LAPACK on matrices
    of a few hundred rows gains little and is much slower when the cores are shared."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lambda_max(gram: Tensor) -> Tensor:
    """Largest eigenvalue of symmetric PSD matrices (batched), in float64."""
    with one_thread():
        return torch.linalg.eigvalsh(gram.double())[..., -1].clamp_min(0.0)


def _eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    with one_thread():
        lam, vec = torch.linalg.eigh(gram)
    return lam, vec


def _cholesky_ok(mat: Tensor) -> bool:
    with one_thread():
        return int(torch.linalg.cholesky_ex(mat)[1]) == 0


def _sigma_from_gram(gram: Tensor, guess: float | None) -> Tensor:
    """Certified ``sqrt(lambda_max(G)) (1 + MARGIN)`` of one symmetric PSD ``G``.

    With a ``guess`` of the norm: if the Cholesky factorization of
    ``guess^2 I - G`` succeeds, that matrix is positive definite up to the backward
    error of Cholesky (``|dA| <= gamma_{n+1} |R^T| |R|``, Higham 2002, Thm 10.3, so
    ``||dA|| <= (n+1) n eps guess^2``, inside :data:`MARGIN` for ``n`` below ~9000),
    hence ``sigma_max <= guess``: a bound at a third of the cost of the eigenvalues,
    which are computed otherwise.
    """
    if guess is not None and guess > 0:
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        if _cholesky_ok(guess**2 * eye - gram):
            return gram.new_tensor(guess * (1.0 + MARGIN))
    return _lambda_max(gram).sqrt() * (1.0 + MARGIN)


def spectral_norm(mat: Tensor, guess: float | None = None) -> Tensor:
    """Certified ``sigma_max(mat)`` (batched over leading dims without ``guess``),
    float64: ``sqrt(lambda_max(G)) (1 + MARGIN)`` with ``G`` the smaller Gram matrix;
    with a ``guess`` that the Cholesky test of :func:`_sigma_from_gram` confirms,
    ``guess (1 + MARGIN)``."""
    m = mat.double()
    if m.shape[-2] == 0 or m.shape[-1] == 0:
        return m.new_zeros(m.shape[:-2])
    gram = m.mT @ m if m.shape[-1] <= m.shape[-2] else m @ m.mT
    if guess is not None and gram.dim() == 2:
        return _sigma_from_gram(gram, guess)
    return _lambda_max(gram).sqrt() * (1.0 + MARGIN)


def _flip_transpose(kernel: Tensor) -> Tensor:
    """The kernel of the adjoint convolution: ``K'[c, o, i, j] = K[o, c, -i, -j]``."""
    return kernel.transpose(0, 1).flip(-2, -1)


def conv_gram(kernel: Tensor, size: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """``A^T A`` of the stride-1 zero-padded convolution ``A`` on ``C_in x H x W`` inputs.

    ``(A x)[o, y] = sum_{c, t} K[o, c, t] x[c, y + t - p]`` (zeros outside the image),
    so ``A^T A = sum_y P_y^T M P_y`` with ``M[(c, t), (c', t')] = sum_o K[o, c, t]
    K[o, c', t']``: for each pair of kernel taps ``(t, t')`` the block ``M[:, t, :, t']``
    is added at input pixels ``(y + t - p, y + t' - p)`` for every output pixel ``y``
    that reads both inside the image. All blocks go in with one indexed accumulation
    (:func:`_gram_index`). Returned in float64, rows ordered ``(h, w, c)``.
    """
    o, c, kh, kw = kernel.shape
    h, w = size
    k = kernel.detach().double()
    m = torch.einsum("oaij,obkl->ijklab", k, k).reshape(kh * kw, kh * kw, c, c)
    rows, cols, taps1, taps2 = _gram_index(kh, kw, size, padding, k.device)
    g = k.new_zeros((h * w, h * w, c, c))
    step = max(1, (1 << 22) // (c * c))  # gathered blocks of at most 32 MB at a time
    for s in range(0, len(rows), step):
        part = slice(s, s + step)
        g.index_put_((rows[part], cols[part]), m[taps1[part], taps2[part]], accumulate=True)
    return g.permute(0, 2, 1, 3).reshape(h * w * c, h * w * c)


def _gram_index(
    kh: int, kw: int, size: tuple[int, int], padding: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For :func:`conv_gram`: every (input pixel, input pixel, tap, tap) that an output
    pixel reads inside the image, as flat indices; cached per shape and device."""
    key = (kh, kw, *size, *padding, str(device))
    found = _GRAM_INDEX.get(key)
    if found is not None:
        return found
    (h, w), (ph, pw) = size, padding
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    ar = torch.arange
    # output pixel (y, x) reads input pixel (y + i - ph, x + j - pw) through tap (i, j)
    yi = (ar(ho).view(-1, 1) + ar(kh) - ph).view(ho, 1, kh, 1)
    xj = (ar(wo).view(-1, 1) + ar(kw) - pw).view(1, wo, 1, kw)
    inside = ((yi >= 0) & (yi < h) & (xj >= 0) & (xj < w)).reshape(ho * wo, -1)
    pix = (yi * w + xj).expand(ho, wo, kh, kw).reshape(ho * wo, -1)
    tap = ar(kh * kw).expand(ho * wo, -1)
    n = kh * kw
    both = inside.unsqueeze(2) & inside.unsqueeze(1)  # [output pixel, tap, tap]

    def pairs(t: Tensor) -> tuple[Tensor, Tensor]:
        return t.unsqueeze(2).expand(-1, n, n)[both], t.unsqueeze(1).expand(-1, n, n)[both]

    rows, cols = pairs(pix)
    taps1, taps2 = pairs(tap)
    found = tuple(t.to(device) for t in (rows, cols, taps1, taps2))
    if len(_GRAM_INDEX) > 64:
        _GRAM_INDEX.clear()
    _GRAM_INDEX[key] = found  # type: ignore[assignment]
    return found  # type: ignore[return-value]


_GRAM_INDEX: dict[tuple[int | str, ...], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def circular_conv_norm(kernel: Tensor, grid: tuple[int, int]) -> Tensor:
    """``||C_N||``: the exact norm of the circular convolution with ``kernel`` on an
    ``N_h x N_w`` grid, ``max_w sigma_max(K^(w))`` over the DFT frequencies, float64
    with :data:`MARGIN`."""
    o, c, kh, kw = kernel.shape
    nh, nw = grid
    if kh > nh or kw > nw:
        raise ValueError(f"grid {grid} is smaller than the kernel {(kh, kw)}")
    spec = torch.fft.fft2(kernel.detach().double(), s=(nh, nw))  # [o, c, nh, nw]
    mats = spec.permute(2, 3, 0, 1).reshape(nh * nw, o, c)
    gram = mats.mH @ mats if c <= o else mats @ mats.mH
    with one_thread():
        lam = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0)
    return lam.max().sqrt() * (1.0 + MARGIN)


def circular_grid(
    size: tuple[int, int], kernel: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int]:
    """The smallest grid ``N = max(n + p, n_out, k)`` per axis on which the zero-padded
    convolution is a restriction of the circular one (see the module docstring; any
    larger ``N`` works too, and ``N >= k`` keeps the kernel's taps from wrapping)."""
    h, w = (max(n + p, n + 2 * p - k + 1, k) for n, k, p in zip(size, kernel, padding))
    return h, w


@dataclass(frozen=True)
class ConvBound:
    """A certified bound on the 2-norm of a convolution operator.

    Attributes:
        value: the bound (float64 scalar tensor).
        exact: whether it is the operator's own norm (up to :data:`MARGIN`).
        method: how it was computed, for reports.
    """

    value: Tensor
    exact: bool
    method: str


def conv_spectral_norm(
    kernel: Tensor,
    size: tuple[int, int],
    padding: tuple[int, int],
    exact_limit: int = EXACT_LIMIT,
    guess: float | None = None,
) -> ConvBound:
    """Certified ``||A||_2`` of the stride-1 zero-padded convolution on ``C_in x size``.

    Exact (Gram matrix of the operator, :func:`conv_gram`) when the smaller side of
    the operator has at most ``exact_limit`` entries, else the circular bound
    (:func:`circular_conv_norm` on :func:`circular_grid`). The adjoint is used when
    its input (the output side) is smaller: ``||A|| = ||A^T||`` and ``A^T`` is the
    convolution with the flipped, transposed kernel and padding ``k - 1 - p``. A
    ``guess`` confirmed by the Cholesky test (:func:`_sigma_from_gram`) is returned
    instead of the exact value (``exact`` is then ``False``).
    """
    o, c, kh, kw = kernel.shape
    if kh == kw == 1 and padding == (0, 0):
        return ConvBound(
            spectral_norm(kernel.reshape(o, c)), True, "exact (1x1: SVD of the kernel)"
        )
    h, w = size
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    if o * ho * wo < c * h * w:
        kernel, size = _flip_transpose(kernel), (ho, wo)
        padding = (kh - 1 - padding[0], kw - 1 - padding[1])
        c = o
    if c * size[0] * size[1] <= exact_limit:
        value = _sigma_from_gram(conv_gram(kernel, size, padding), guess)
        return ConvBound(value, guess is None, "exact (Gram matrix of the operator)")
    grid = circular_grid(size, (kh, kw), padding)
    return ConvBound(
        circular_conv_norm(kernel, grid), False, f"bound (circular on {grid[0]}x{grid[1]})"
    )


def spectral_bound_holds(
    weight: Tensor,
    guess: float,
    size: tuple[int, int] | None = None,
    padding: tuple[int, int] = (0, 0),
) -> bool | None:
    """Whether the Cholesky test (:func:`_sigma_from_gram`) confirms ``||A||_2 <= guess``
    for a dense weight (``size=None``) or the convolution on ``C_in x size``; ``None``
    above :data:`EXACT_LIMIT`."""
    gram = operator_gram(weight, size, padding)
    if gram is None:
        return None
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return _cholesky_ok(guess**2 * eye - gram)


def operator_gram(
    weight: Tensor, size: tuple[int, int] | None = None, padding: tuple[int, int] = (0, 0)
) -> Tensor | None:
    """The smaller Gram matrix (``A^T A`` or ``A A^T``, float64) of a dense weight
    (``size=None``) or of the convolution on ``C_in x size``; ``None`` above
    :data:`EXACT_LIMIT`."""
    w = weight.detach().double()
    if size is None or w.shape[-1] == w.shape[-2] == 1:
        m = w.reshape(w.shape[0], -1)
        gram = m.mT @ m if m.shape[1] <= m.shape[0] else m @ m.mT
    else:
        o, c, kh, kw = w.shape
        (h, wd), (ph, pw) = size, padding
        ho, wo = h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1
        if min(c * h * wd, o * ho * wo) > EXACT_LIMIT:
            return None
        if c * h * wd <= o * ho * wo:
            gram = conv_gram(w, size, padding)
        else:
            gram = conv_gram(_flip_transpose(w), (ho, wo), (kh - 1 - ph, kw - 1 - pw))
    return None if min(gram.shape) > EXACT_LIMIT else gram


def top_singular_vector(
    weight: Tensor, size: tuple[int, int] | None = None, padding: tuple[int, int] = (0, 0)
) -> tuple[Tensor, Tensor] | None:
    """``(sigma, v)``: the certified norm (with :data:`MARGIN`) and a top right singular
    vector of a dense weight (``size=None``; ``v`` of shape ``[n]``) or of the
    convolution on ``C_in x size`` (``v`` of shape ``[C_in, H, W]``), from the
    eigendecomposition of the smaller Gram matrix, float64; ``None`` above
    :data:`EXACT_LIMIT`. Used to restart a power iteration that converges slowly."""
    w = weight.detach().double()
    if size is None or w.shape[-1] == w.shape[-2] == 1:
        m = w.reshape(w.shape[0], -1)
        if min(m.shape) > EXACT_LIMIT:
            return None
        small_in = m.shape[1] <= m.shape[0]
        lam, vec = _eigh(m.mT @ m if small_in else m @ m.mT)
        top = vec[:, -1] if small_in else m.mT @ vec[:, -1]
        sigma = lam[-1].clamp_min(0.0).sqrt() * (1.0 + MARGIN)
        if size is None:
            return sigma, top / top.norm().clamp_min(1e-300)
        v = top.view(-1, 1, 1).expand(-1, *size).clone()  # constant image: a top vector
        return sigma, v / v.norm().clamp_min(1e-300)
    o, c, kh, kw = w.shape
    (h, wd), (ph, pw) = size, padding
    ho, wo = h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1
    small_in = c * h * wd <= o * ho * wo
    if min(c * h * wd, o * ho * wo) > EXACT_LIMIT:
        return None
    if small_in:
        lam, vec = _eigh(conv_gram(w, size, padding))
        top = vec[:, -1].view(h, wd, c).permute(2, 0, 1)
    else:
        flipped = _flip_transpose(w)
        lam, vec = _eigh(conv_gram(flipped, (ho, wo), (kh - 1 - ph, kw - 1 - pw)))
        u = vec[:, -1].view(ho, wo, o).permute(2, 0, 1).unsqueeze(0)
        top = torch.nn.grad.conv2d_input((1, c, h, wd), w, u, padding=padding)[0]
    sigma = lam[-1].clamp_min(0.0).sqrt() * (1.0 + MARGIN)
    return sigma, top / top.norm().clamp_min(1e-300)


def rounding_margin(dtype: torch.dtype, dim: int) -> float:
    """Relative margin that covers storing ``W / s`` in ``dtype``: each entry is off by
    at most ``u = eps/2`` relatively, which moves the 2-norm by at most
    ``u ||W||_F <= u sqrt(dim) ||W||`` (``dim`` the smaller side), plus ``2u`` for the
    scale itself."""
    u = torch.finfo(dtype).eps / 2
    return u * (2.0 + math.sqrt(max(dim, 1)))
