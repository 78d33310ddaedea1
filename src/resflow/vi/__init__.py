"""Flows for variational inference: reverse-KL fitting to unnormalized densities and
flow posteriors in a VAE.

* :mod:`resflow.vi.targets` -- test energies (two moons, ring mixture, banana, funnel);
* :mod:`resflow.vi.reverse_kl` -- :func:`sampling_direction`, :class:`ReverseKL`,
  :func:`fit_reverse_kl`, :func:`estimate_kl`, their defaults (:class:`ReverseKLConfig`);
* :mod:`resflow.vi.vae` -- :class:`VAE` with Gaussian, IAF-affine, IAF-DSF or residual
  posteriors, its ELBO and importance-weighted bound.
"""

from resflow.vi.reverse_kl import (
    KLEstimate,
    ReverseKL,
    ReverseKLConfig,
    estimate_kl,
    fit_reverse_kl,
    sampling_direction,
)
from resflow.vi.targets import TARGETS, Target, make_target
from resflow.vi.vae import VAE, VAEConfig, VAEResult, binarize, evaluate_vae, fit_vae

__all__ = [
    "KLEstimate",
    "ReverseKL",
    "ReverseKLConfig",
    "TARGETS",
    "Target",
    "VAE",
    "VAEConfig",
    "VAEResult",
    "binarize",
    "estimate_kl",
    "evaluate_vae",
    "fit_reverse_kl",
    "fit_vae",
    "make_target",
    "sampling_direction",
]
