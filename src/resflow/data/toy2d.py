"""Two-dimensional toy densities used in the FFJORD / Residual Flows / NAF papers.

Every dataset is sampled with the torch RNG (pass a seeded :class:`torch.Generator`
for reproducibility) and returned as a ``float32`` tensor of shape ``[n, 2]``.

Three of the densities are simple enough to have an exact density:

* ``8gaussians`` -- an equal-weight mixture of 8 isotropic Gaussians,
* ``checkerboard`` -- uniform on 8 squares of side 2 inside ``[-4, 4]^2``,
* ``grid`` -- an equal-weight mixture of a 10 x 10 grid of isotropic Gaussians,

and for those :func:`toy_log_density` evaluates ``log p(x)`` and :func:`toy_entropy`
returns the differential entropy ``H = -E[log p(x)]`` in nats (the best achievable
expected negative log-likelihood of a model fitted to that data). The others
(``2spirals``, ``pinwheel``, ``rings``, ``moons``, ``circles``, ``swissroll``) are
defined only through their sampling procedure.

Exact entropies (computed numerically from the exact densities, see
:func:`toy_entropy`): ``8gaussians`` 2.8319, ``checkerboard`` ``ln 32`` = 3.4657,
``grid`` 4.2677 nats.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["TOY_DATASETS", "sample_toy", "toy_entropy", "toy_log_density"]

TOY_DATASETS: tuple[str, ...] = (
    "8gaussians",
    "checkerboard",
    "2spirals",
    "pinwheel",
    "rings",
    "moons",
    "circles",
    "swissroll",
    "grid",
)

_ANALYTIC: tuple[str, ...] = ("8gaussians", "checkerboard", "grid")

# --- parameters of the analytic densities ---------------------------------------------

# 8gaussians: centres 4 * (unit vectors at multiples of 45 degrees), noise std 0.5, and the
# whole sample divided by 1.414 (the FFJORD convention, kept literally rather than sqrt(2)).
_8G_SCALE = 4.0
_8G_NOISE = 0.5
_8G_DIV = 1.414

# grid: 10 x 10 means on linspace(-5, 5, 10) in each coordinate, variance 1 / (10 ln 10).
_GRID_K = 10
_GRID_LO, _GRID_HI = -5.0, 5.0
_GRID_VAR = 1.0 / (10.0 * math.log(10.0))


def _check_name(name: str) -> None:
    if name not in TOY_DATASETS:
        raise ValueError(
            f"unknown toy dataset {name!r}; expected one of: {', '.join(TOY_DATASETS)}"
        )


def _8g_centers(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 8 mixture centres in the final (divided) coordinates, shape ``[8, 2]``."""
    s = 1.0 / math.sqrt(2.0)
    unit = torch.tensor(
        [(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)],
        dtype=torch.float64,
    )
    return (unit * _8G_SCALE / _8G_DIV).to(dtype)


def _grid_means(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 10 one-dimensional grid coordinates ``linspace(-5, 5, 10)``."""
    return torch.linspace(_GRID_LO, _GRID_HI, _GRID_K, dtype=dtype)


# --- samplers ---------------------------------------------------------------------------


def _randn(n: int, g: torch.Generator | None) -> Tensor:
    return torch.randn(n, 2, generator=g, dtype=torch.float64)


def _rand(n: int, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _sample_8gaussians(n: int, g: torch.Generator | None) -> Tensor:
    """8 Gaussians on a circle.

    ``x = (4 u_k + 0.5 eps) / 1.414`` with ``k ~ U{0..7}``, ``u_k`` the unit vector at angle
    ``45 k`` degrees and ``eps ~ N(0, I)``. Equivalently an equal-weight mixture of
    ``N(4 u_k / 1.414, (0.5 / 1.414)^2 I)``.
    """
    k = torch.randint(0, 8, (n,), generator=g)
    return _8g_centers()[k] + (_8G_NOISE / _8G_DIV) * _randn(n, g)


def _sample_checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    """Checkerboard.

    ``x1 ~ U(-2, 2)``, ``x2 = U(0, 1) - 2 B + (floor(x1) mod 2)`` with ``B ~ U{0, 1}``, and
    both coordinates multiplied by 2. This is the uniform density ``1/32`` on the 8 squares
    ``[2i, 2i+2) x [2j, 2j+2)`` (``i, j`` in ``-2..1``) of ``[-4, 4)^2`` with ``i + j`` even.
    """
    x1 = 4.0 * _rand(n, g) - 2.0
    b = torch.randint(0, 2, (n,), generator=g).to(torch.float64)
    x2 = _rand(n, g) - 2.0 * b + torch.remainder(torch.floor(x1), 2.0)
    return 2.0 * torch.stack([x1, x2], dim=1)


def _sample_grid(n: int, g: torch.Generator | None) -> Tensor:
    """10 x 10 grid of Gaussians (NAF).

    Equal-weight mixture of ``N((m_i, m_j), s^2 I)`` with ``m = linspace(-5, 5, 10)`` (grid
    spacing ``10/9``) and ``s^2 = 1 / (10 ln 10)``, i.e. ``s ~ 0.208``.
    """
    ij = torch.randint(0, _GRID_K, (n, 2), generator=g)
    return _grid_means()[ij] + math.sqrt(_GRID_VAR) * _randn(n, g)


def _sample_2spirals(n: int, g: torch.Generator | None) -> Tensor:
    """Two interleaved spirals.

    ``t = sqrt(u) * 3 pi`` (``u ~ U(0, 1)``, i.e. up to 540 degrees), a point
    ``(-t cos t + 0.5 a, t sin t + 0.5 b)`` with ``a, b ~ U(0, 1)``, reflected through the
    origin for the second arm (chosen with probability 1/2); then divided by 3 and
    perturbed by ``0.1 N(0, I)``.
    """
    t = torch.sqrt(_rand(n, g)) * 3.0 * math.pi
    jitter = 0.5 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) + jitter
    sign = 2.0 * torch.randint(0, 2, (n, 1), generator=g).to(torch.float64) - 1.0
    return sign * arm / 3.0 + 0.1 * _randn(n, g)


def _sample_pinwheel(n: int, g: torch.Generator | None) -> Tensor:
    """Pinwheel with 5 arms.

    Radial coordinate ``r = 1 + 0.3 e1`` and tangential ``s = 0.1 e2`` (``e ~ N(0, I)``);
    arm ``k ~ U{0..4}`` is rotated by ``2 pi k / 5 + 0.25 exp(r)`` (the twist grows with
    the radius); the result is scaled by 2.
    """
    num_arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    e = _randn(n, g)
    r = 1.0 + radial_std * e[:, 0]
    s = tangential_std * e[:, 1]
    k = torch.randint(0, num_arms, (n,), generator=g).to(torch.float64)
    angle = 2.0 * math.pi * k / num_arms + rate * torch.exp(r)
    c, si = torch.cos(angle), torch.sin(angle)
    return 2.0 * torch.stack([c * r - si * s, si * r + c * s], dim=1)


def _sample_rings(n: int, g: torch.Generator | None) -> Tensor:
    """Four concentric rings.

    Radius ``3 r`` with ``r ~ U{0.25, 0.5, 0.75, 1}``, angle ``~ U(0, 2 pi)``, plus
    ``0.08 N(0, I)`` noise.
    """
    r = 0.25 * (1.0 + torch.randint(0, 4, (n,), generator=g).to(torch.float64))
    theta = 2.0 * math.pi * _rand(n, g)
    ring = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) * r[:, None]
    return 3.0 * ring + 0.08 * _randn(n, g)


def _sample_moons(n: int, g: torch.Generator | None) -> Tensor:
    """Two interleaving half moons (as ``sklearn.datasets.make_moons``).

    Upper moon ``(cos t, sin t)``, lower moon ``(1 - cos t, 0.5 - sin t)`` with
    ``t ~ U(0, pi)`` and each moon chosen with probability 1/2, plus ``0.1 N(0, I)`` noise;
    then mapped by ``x -> 2 x + (-1, -0.2)`` to be roughly centred in ``[-4, 4]^2``.
    """
    t = math.pi * _rand(n, g)
    lower = torch.randint(0, 2, (n,), generator=g).bool()
    upper_pts = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower_pts = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    x = torch.where(lower[:, None], lower_pts, upper_pts) + 0.1 * _randn(n, g)
    return 2.0 * x + torch.tensor([-1.0, -0.2], dtype=torch.float64)


def _sample_circles(n: int, g: torch.Generator | None) -> Tensor:
    """Two concentric circles (as ``sklearn.datasets.make_circles(factor=0.5)``).

    Radius 1 or 0.5 with probability 1/2 each, angle ``~ U(0, 2 pi)``, plus
    ``0.08 N(0, I)`` noise; everything scaled by 3.
    """
    r = torch.where(torch.randint(0, 2, (n,), generator=g).bool(), 0.5, 1.0).to(torch.float64)
    theta = 2.0 * math.pi * _rand(n, g)
    x = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) * r[:, None]
    return 3.0 * (x + 0.08 * _randn(n, g))


def _sample_swissroll(n: int, g: torch.Generator | None) -> Tensor:
    """2-D Swiss roll (the ``(x, z)`` plane of ``sklearn.datasets.make_swiss_roll``).

    ``t = 1.5 pi (1 + 2 u)`` with ``u ~ U(0, 1)``, point ``(t cos t, t sin t) + N(0, I)``,
    divided by 5.
    """
    t = 1.5 * math.pi * (1.0 + 2.0 * _rand(n, g))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + _randn(n, g)
    return x / 5.0


_SAMPLERS = {
    "8gaussians": _sample_8gaussians,
    "checkerboard": _sample_checkerboard,
    "2spirals": _sample_2spirals,
    "pinwheel": _sample_pinwheel,
    "rings": _sample_rings,
    "moons": _sample_moons,
    "circles": _sample_circles,
    "swissroll": _sample_swissroll,
    "grid": _sample_grid,
}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``n`` samples from the toy density ``name``.

    Args:
        name: one of :data:`TOY_DATASETS`.
        n: number of samples (``>= 0``).
        generator: torch RNG to draw from (a CPU generator); ``None`` uses the global RNG.

    Returns:
        ``float32`` tensor of shape ``[n, 2]`` (on the CPU).
    """
    _check_name(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if n == 0:
        return torch.zeros(0, 2)
    return _SAMPLERS[name](n, generator).to(torch.float32)


# --- exact densities --------------------------------------------------------------------


def _gauss_mixture_logpdf(x: Tensor, centers: Tensor, var: float) -> Tensor:
    """Log density of an equal-weight mixture of ``N(c_k, var I)``; ``x`` is ``[n, d]``."""
    d = x.shape[-1]
    sq = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    comp = -0.5 * sq / var - 0.5 * d * math.log(2.0 * math.pi * var)
    return torch.logsumexp(comp, dim=1) - math.log(centers.shape[0])


def _logpdf_8gaussians(x: Tensor) -> Tensor:
    return _gauss_mixture_logpdf(x, _8g_centers(), (_8G_NOISE / _8G_DIV) ** 2)


def _logpdf_grid(x: Tensor) -> Tensor:
    # The grid mixture factorises: p(x1, x2) = q(x1) q(x2) with q a 1-D mixture of 10.
    means = _grid_means()[:, None]
    return _gauss_mixture_logpdf(x[:, :1], means, _GRID_VAR) + _gauss_mixture_logpdf(
        x[:, 1:], means, _GRID_VAR
    )


def _logpdf_checkerboard(x: Tensor) -> Tensor:
    # Support = union of the 8 *closed* squares [2i, 2i+2] x [2j, 2j+2], i + j even. Closing
    # them only changes a null set, but keeps float32-rounded samples that land exactly on
    # a square's edge inside the support.
    inside = torch.zeros(x.shape[0], dtype=torch.bool)
    for i in range(-2, 2):
        for j in range(-2, 2):
            if (i + j) % 2 == 0:
                lo = torch.tensor([2.0 * i, 2.0 * j], dtype=x.dtype)
                inside |= ((x >= lo) & (x <= lo + 2.0)).all(dim=1)
    out = torch.full(x.shape[:1], -math.log(32.0), dtype=x.dtype)
    return torch.where(inside, out, torch.full_like(out, -math.inf))


_LOGPDFS = {
    "8gaussians": _logpdf_8gaussians,
    "checkerboard": _logpdf_checkerboard,
    "grid": _logpdf_grid,
}


def toy_log_density(name: str, x: Tensor) -> Tensor:
    """Exact ``log p(x)`` of a toy density, for ``8gaussians``, ``checkerboard`` and ``grid``.

    Args:
        name: dataset name.
        x: points, shape ``[n, 2]``.

    Returns:
        ``[n]`` log densities in the dtype of ``x`` (``float32`` for integer input);
        computed in float64. For ``checkerboard`` it is ``-log 32`` on the support and
        ``-inf`` outside it.

    Raises:
        ValueError: unknown name, a dataset without an analytic density, or ``x`` not
            of shape ``[n, 2]``.
    """
    _check_name(name)
    if name not in _LOGPDFS:
        raise ValueError(
            f"toy dataset {name!r} has no analytic density; only {', '.join(_ANALYTIC)} do"
        )
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape [n, 2], got {tuple(x.shape)}")
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    return _LOGPDFS[name](x.detach().to("cpu", torch.float64)).to(x.device, out_dtype)


# --- entropies --------------------------------------------------------------------------


def _neg_p_log_p(logp: np.ndarray) -> np.ndarray:
    return -np.exp(logp) * logp


def _mixture_logpdf_np(x: np.ndarray, centers: np.ndarray, var: float) -> np.ndarray:
    d = centers.shape[1]
    sq = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    comp = -0.5 * sq / var - 0.5 * d * math.log(2.0 * math.pi * var) - math.log(len(centers))
    m = comp.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(comp - m).sum(axis=1, keepdims=True)))[:, 0]


@functools.cache
def _entropy_8gaussians() -> float:
    # Trapezoid rule on a 0.01-spaced grid over [-6, 6]^2 (the integrand is smooth and
    # negligible at the border: centres at radius 2.83, component std 0.354), evaluated in
    # row chunks. The rule converges spectrally here, error << 1e-6.
    centers = _8g_centers().numpy()
    var = (_8G_NOISE / _8G_DIV) ** 2
    t = np.linspace(-6.0, 6.0, 1201)
    h = t[1] - t[0]
    total = 0.0
    for rows in np.array_split(t, 24):
        xx, yy = np.meshgrid(rows, t, indexing="ij")
        pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
        total += float(_neg_p_log_p(_mixture_logpdf_np(pts, centers, var)).sum())
    return total * h * h


@functools.cache
def _entropy_grid() -> float:
    # The density factorises into two identical 1-D mixtures q, so H = 2 H(q); H(q) by the
    # trapezoid rule on a 1e-3-spaced grid over [-8, 8].
    means = _grid_means().numpy()[:, None]
    t = np.linspace(-8.0, 8.0, 16001)
    h = t[1] - t[0]
    h1 = float(_neg_p_log_p(_mixture_logpdf_np(t[:, None], means, _GRID_VAR)).sum()) * h
    return 2.0 * h1


def toy_entropy(name: str) -> float | None:
    """Differential entropy ``-E[log p(x)]`` in nats, or ``None`` without an exact density.

    * ``8gaussians``: 2.8319 (numerical integration of the exact mixture density; the
      well-separated approximation ``ln 8 + ln(2 pi e s^2)`` with ``s = 0.5/1.414`` gives
      2.8382, the small overlap between neighbouring components lowers it by 0.006).
    * ``checkerboard``: ``ln 32`` = 3.4657 (uniform on an area of 32).
    * ``grid``: 4.2677 (numerical integration; ``ln 100 + ln(2 pi e s^2)`` = 4.3064 for
      separated components, lowered by the overlap of neighbouring components).

    Values are computed once on first use and cached.
    """
    _check_name(name)
    if name == "8gaussians":
        return _entropy_8gaussians()
    if name == "checkerboard":
        return math.log(32.0)
    if name == "grid":
        return _entropy_grid()
    return None
