"""A variational autoencoder on binary images with a flow posterior.

The encoder gives ``mu, log sigma`` and a context ``h``; the posterior draws
``z_0 = mu + sigma * eps`` and pushes it through ``n_flows`` layers in their cheap
direction (one pass each), ``z = T(z_0; h)``, so that

    log q(z | x) = log N(z_0; mu, sigma) - log|det dT/dz_0|.

Posteriors (``posterior``):

* ``gaussian`` -- no flow (the plain VAE);
* ``iaf-affine`` -- inverse autoregressive flow (Kingma et al. 2016): MADE layers that
  see ``h``, ``z_d = z_{0,d} * sigmoid(s_d + 2) + m_d``, orders reversed between layers;
* ``iaf-dsf`` -- the same with NAF's deep sigmoidal flow as the transformer (the NAF
  paper's IAF-DSF);
* ``residual`` -- residual blocks ``z + g(z)`` (Lipschitz-constrained MLPs, not
  amortized), unbiased Russian-roulette logdets in training and exact ones in
  evaluation.

The decoder gives Bernoulli logits; the prior is ``N(0, I)``. :meth:`VAE.elbo` is the
evidence lower bound per image, :meth:`VAE.log_likelihood` the importance-weighted bound
``log mean_k p(x, z_k) / q(z_k | x)`` (Burda et al. 2016), which tightens towards
``log p(x)`` as ``K`` grows.

References:
    Kingma & Welling (2014), Auto-encoding variational Bayes.
    Kingma et al. (2016), Improved variational inference with inverse autoregressive flow.
    Huang, Krueger, Lacoste & Courville (2018), Neural autoregressive flows (IAF-DSF).
    Burda, Grosse & Salakhutdinov (2016), Importance weighted autoencoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resflow.config import Config, param
from resflow.layers.autoregressive import Autoregressive
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.permutation import Reverse
from resflow.layers.residual import EXACT_ESTIMATOR, LogdetEstimator, ResidualBlock
from resflow.layers.sigmoidal import DSF
from resflow.layers.transformers import Affine
from resflow.nets import residual_mlp
from resflow.nets.made import MADE

Posterior = Literal["gaussian", "iaf-affine", "iaf-dsf", "residual"]
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig(Config):
    """A VAE for ``image_size`` binary pixels (defaults: MNIST, 32 latents)."""

    image_size: int = param(784, ge=1, le=10**7, help="pixels per (flattened) image")
    latent: int = param(32, ge=2, le=4096, help="latent dimension")
    hidden: tuple[int, ...] = param((300, 300), ge=1, le=65536, help="encoder/decoder widths")
    context: int = param(64, ge=1, le=4096, help="encoder context h fed to the IAF layers")
    posterior: Posterior = param("iaf-affine", help="gaussian, iaf-affine, iaf-dsf, residual")
    n_flows: int = param(2, ge=0, le=64, help="posterior flow layers")
    flow_hidden: tuple[int, ...] = param((256, 256), ge=1, le=65536, help="MADE / g widths")
    sigmoid_units: int = param(16, ge=1, le=1024, help="DSF sigmoid units (iaf-dsf)")


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ELU()]
    return nn.Sequential(*layers[:-1])


def _posterior_flow(cfg: VAEConfig) -> Sequential:
    layers: list[FlowLayer] = []
    for i in range(cfg.n_flows if cfg.posterior != "gaussian" else 0):
        if cfg.posterior == "residual":
            g = residual_mlp(cfg.latent, cfg.flow_hidden, coeff=0.97, activation="lipswish")
            train = LogdetEstimator(grad_in_forward=False)
            layers.append(ResidualBlock(g, train_estimator=train, eval_estimator=EXACT_ESTIMATOR))
            continue
        transformer = Affine("sigmoid") if cfg.posterior == "iaf-affine" else DSF(cfg.sigmoid_units)
        made = MADE(cfg.latent, cfg.flow_hidden, transformer.n_params,
                    context_features=cfg.context, activation="elu")  # fmt: skip
        layers.append(Autoregressive(made, transformer))
        if i < cfg.n_flows - 1:
            layers.append(Reverse(cfg.latent))
    return Sequential(layers)


class VAE(nn.Module):
    """Encoder, flow posterior and Bernoulli decoder (see the module docstring).

    Example:
        >>> vae = VAE(VAEConfig(image_size=16, latent=4, hidden=(32,), posterior="iaf-dsf"))
        >>> x = torch.bernoulli(torch.full((5, 16), 0.3))
        >>> vae.elbo(x).shape, vae.log_likelihood(x, k=8).shape
        (torch.Size([5]), torch.Size([5]))
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _mlp([cfg.image_size, *cfg.hidden, 2 * cfg.latent + cfg.context])
        self.decoder = _mlp([cfg.latent, *cfg.hidden[::-1], cfg.image_size])
        self.flow = _posterior_flow(cfg)

    def _check(self, x: Tensor) -> Tensor:
        x = x.flatten(1).to(self.decoder[0].weight.dtype)
        if x.shape[1] != self.cfg.image_size:
            raise ValueError(f"the VAE expects {self.cfg.image_size} pixels, got {x.shape[1]}")
        if not ((x == 0) | (x == 1)).all():
            raise ValueError("the VAE models binary images: every pixel must be 0 or 1")
        return x

    def log_weights(self, x: Tensor, k: int = 1) -> Tensor:
        """``log p(x, z_k) - log q(z_k | x)`` for ``k`` posterior samples, ``[B, k]``."""
        x = self._check(x)
        d = self.cfg.latent
        out = self.encoder(x)
        mu, log_sigma, h = out[:, :d], out[:, d : 2 * d].clamp(-10, 5), out[:, 2 * d :]
        b = x.shape[0]
        rep = lambda t: t.repeat_interleave(k, 0)  # noqa: E731  [B * k, ...]
        eps = torch.randn(b * k, d, dtype=x.dtype, device=x.device)
        z0 = rep(mu) + rep(log_sigma).exp() * eps
        log_q0 = (-0.5 * eps**2 - rep(log_sigma) - 0.5 * _LOG_2PI).sum(1)
        z, logdet = self.flow(z0, rep(h))
        log_q = log_q0 - logdet
        log_prior = (-0.5 * z**2 - 0.5 * _LOG_2PI).sum(1)
        logits = self.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, rep(x), reduction="none").sum(1)
        return (log_lik + log_prior - log_q).view(b, k)

    def elbo(self, x: Tensor, k: int = 1) -> Tensor:
        """The evidence lower bound per image (averaged over ``k`` samples), nats."""
        return self.log_weights(x, k).mean(1)

    def log_likelihood(self, x: Tensor, k: int = 100) -> Tensor:
        """The importance-weighted bound ``log mean_k w_k`` per image, nats."""
        return torch.logsumexp(self.log_weights(x, k), 1) - math.log(k)


def binarize(images: Tensor, levels: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Dynamic binarization: pixel ``v`` becomes 1 with probability ``v / (levels - 1)``
    (float ``[N, pixels]``)."""
    p = images.flatten(1).double() / (levels - 1)
    return torch.bernoulli(p, generator=generator).float()


@dataclass
class VAEResult:
    """Test ELBO and importance-weighted bound (``k`` samples), nats per image, with
    their standard errors over the ``n`` images."""

    elbo: float
    elbo_stderr: float
    log_likelihood: float
    log_likelihood_stderr: float
    k: int
    n: int

    def __str__(self) -> str:
        return (
            f"ELBO {self.elbo:.2f} +- {self.elbo_stderr:.2f}, log p(x) >= "
            f"{self.log_likelihood:.2f} +- {self.log_likelihood_stderr:.2f} nats "
            f"(K={self.k}, n={self.n})"
        )


@torch.no_grad()
def evaluate_vae(vae: VAE, x: Tensor, k: int = 100, batch_size: int = 100) -> VAEResult:
    """ELBO (one sample per image) and the ``k``-sample bound on binary images ``x``."""
    vae.eval()
    elbo, iw = [], []
    for i in range(0, len(x), batch_size):
        w = vae.log_weights(x[i : i + batch_size], k)
        elbo.append(w[:, 0])
        iw.append(torch.logsumexp(w, 1) - math.log(k))
    e, ll = torch.cat(elbo).double(), torch.cat(iw).double()
    n = len(e)
    se = lambda t: float(t.std() / math.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    return VAEResult(float(e.mean()), se(e), float(ll.mean()), se(ll), k, n)


def fit_vae(
    vae: VAE,
    images: Tensor,
    steps: int,
    batch_size: int = 100,
    lr: float = 1e-3,
    levels: int = 256,
    progress: bool = True,
    seed: int = 0,
    max_seconds: float | None = None,
) -> list[dict[str, float]]:
    """Maximize the ELBO with Adam on dynamically binarized ``images`` (integer levels,
    any shape ``[N, ...]``); stops after ``steps`` or ``max_seconds``. Returns the
    training ELBO per step."""
    import time

    from tqdm.auto import tqdm

    from resflow.layers.base import after_optimizer_step

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    history = []
    t0 = time.perf_counter()
    vae.train()
    bar = tqdm(range(steps), disable=not progress, desc=f"VAE ({vae.cfg.posterior})")
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = binarize(images[idx], levels, gen)
        loss = -vae.elbo(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 100.0)
        opt.step()
        after_optimizer_step(vae)
        history.append({"step": step + 1, "elbo": -float(loss.detach())})
        if (step + 1) % 50 == 0:
            bar.set_postfix(elbo=f"{history[-1]['elbo']:.2f}")
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    vae.eval()
    return history
