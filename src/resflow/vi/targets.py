"""Target densities for variational inference: unnormalized ``log p~(x)`` to fit a flow
to by reverse KL.

* ``two-moons`` -- the ring with two lobes of Rezende & Mohamed (2015), energy
  ``U(z) = 1/2 ((|z| - 2) / 0.4)^2 - log(exp(-1/2 ((z_1 - 2)/0.6)^2) +
  exp(-1/2 ((z_1 + 2)/0.6)^2))``; its ``log Z`` is computed by quadrature on a grid;
* ``ring-mixture`` -- 8 equal Gaussians (std 0.3) on the circle of radius 3, normalized;
* ``banana`` -- ``x_1 ~ N(0, 2^2)``, ``x_2 | x_1 ~ N(x_1^2 / 4 - 1, 0.5^2)``, normalized;
* ``funnel`` -- Neal's funnel in ``dim`` dimensions: ``v ~ N(0, 3^2)``,
  ``x_i | v ~ N(0, e^v)``, normalized.

A target with a known ``log_z`` gives the exact KL estimate
``KL(q || p) = E_q[log q - log p~] + log Z``; one that can be sampled also gives test
points for the forward direction.

References:
    Rezende & Mohamed (2015), Variational inference with normalizing flows.
    Neal (2003), Slice sampling (the funnel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from resflow.registry import Registry

_LOG_2PI = math.log(2 * math.pi)


def _log_normal(x: Tensor, mean: Tensor | float, std: Tensor | float) -> Tensor:
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - mean) / std_t) ** 2 - std_t.log() - 0.5 * _LOG_2PI


@dataclass(frozen=True)
class Target:
    """An unnormalized density on ``R^dim``.

    Attributes:
        name: registry name.
        dim: dimension.
        log_prob: ``x [N, dim] -> log p~(x) [N]`` (unnormalized).
        log_z: ``log`` of the normalizer, when known (``None`` otherwise).
        sampler: ``(n, generator) -> [n, dim]`` exact samples, when available.
        lim: half-width of the square that holds its mass (for plots, 2-D).
    """

    name: str
    dim: int
    log_prob: Callable[[Tensor], Tensor]
    log_z: float | None = None
    sampler: Callable[[int, torch.Generator], Tensor] | None = None
    lim: float = 4.0

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"target {self.name} expects [N, {self.dim}], got {tuple(x.shape)}")
        return self.log_prob(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.sampler is None:
            raise ValueError(f"target {self.name} cannot be sampled exactly")
        return self.sampler(n, generator or torch.Generator().manual_seed(0))


def _two_moons(x: Tensor) -> Tensor:
    r = x.norm(dim=1)
    lobes = torch.logsumexp(
        torch.stack([-0.5 * ((x[:, 0] - 2) / 0.6) ** 2, -0.5 * ((x[:, 0] + 2) / 0.6) ** 2]), 0
    )
    return -0.5 * ((r - 2) / 0.4) ** 2 + lobes


_RING = (
    3.0
    * torch.stack(
        [torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1
    ).double()
)


def _ring_mixture(x: Tensor) -> Tensor:
    means = _RING.to(x)
    comp = _log_normal(x[:, None, :], means[None], 0.3).sum(-1)  # [N, 8]
    return torch.logsumexp(comp, 1) - math.log(8)


def _ring_sample(n: int, gen: torch.Generator) -> Tensor:
    k = torch.randint(0, 8, (n,), generator=gen)
    return (_RING[k] + 0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float()


def _banana(x: Tensor) -> Tensor:
    return _log_normal(x[:, 0], 0.0, 2.0) + _log_normal(x[:, 1], x[:, 0] ** 2 / 4 - 1, 0.5)


def _banana_sample(n: int, gen: torch.Generator) -> Tensor:
    x1 = 2.0 * torch.randn(n, generator=gen)
    return torch.stack([x1, x1**2 / 4 - 1 + 0.5 * torch.randn(n, generator=gen)], 1)


def _funnel(x: Tensor) -> Tensor:
    v = x[:, 0]
    return _log_normal(v, 0.0, 3.0) + _log_normal(x[:, 1:], 0.0, (v / 2).exp()[:, None]).sum(1)


def _funnel_sampler(dim: int) -> Callable[[int, torch.Generator], Tensor]:
    def sample(n: int, gen: torch.Generator) -> Tensor:
        v = 3.0 * torch.randn(n, 1, generator=gen)
        return torch.cat([v, (v / 2).exp() * torch.randn(n, dim - 1, generator=gen)], 1)

    return sample


def grid_log_z(log_prob: Callable[[Tensor], Tensor], lim: float, n: int = 1000) -> float:
    """``log`` of the integral of ``exp(log_prob)`` over ``[-lim, lim]^2`` (midpoint rule,
    float64): the normalizer of a 2-D density whose mass lies inside that square."""
    h = 2 * lim / n
    g = torch.linspace(-lim + h / 2, lim - h / 2, n, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    return float(torch.logsumexp(log_prob(xy), 0)) + 2 * math.log(h)


TARGETS: Registry[Callable[..., Target]] = Registry("target")


DEFAULT_DIM = 2
"""The dimension of a target whose dimension can be chosen (``funnel``)."""


def make_target(name: str, dim: int = DEFAULT_DIM) -> Target:
    """The registered target ``name`` (``dim`` applies to ``funnel``; the others are 2-D)."""
    return TARGETS.get(name)(dim)


def _fixed_2d(name: str, fn: Callable[[Tensor], Tensor], **kw: object) -> Callable[..., Target]:
    def make(dim: int = 2) -> Target:
        if dim != 2:
            raise ValueError(f"target {name} is 2-D, got dim={dim}")
        return Target(name, 2, fn, **kw)  # type: ignore[arg-type]

    return make


TARGETS.register(
    "two-moons", _fixed_2d("two-moons", _two_moons, log_z=grid_log_z(_two_moons, 5.0), lim=4.0)
)
TARGETS.register(
    "ring-mixture",
    _fixed_2d("ring-mixture", _ring_mixture, log_z=0.0, sampler=_ring_sample, lim=4.5),
)
TARGETS.register("banana", _fixed_2d("banana", _banana, log_z=0.0, sampler=_banana_sample, lim=6.0))


def _make_funnel(dim: int = 2) -> Target:
    if dim < 2:
        raise ValueError(f"the funnel needs dim >= 2, got {dim}")
    return Target("funnel", dim, _funnel, log_z=0.0, sampler=_funnel_sampler(dim), lim=8.0)


TARGETS.register("funnel", _make_funnel)
