"""The VAE with flow posteriors: its bounds against log p(x) computed by quadrature on
a 2-D latent, the importance-weighted bound tightening with K, training, and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from resflow.data import load_data
from resflow.vi import VAE, VAEConfig, binarize, evaluate_vae, fit_vae

POSTERIORS = ["gaussian", "iaf-affine", "iaf-dsf", "residual"]


def _tiny(posterior: str) -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(image_size=6, latent=2, hidden=(16,), context=4, posterior=posterior,
                    n_flows=2, flow_hidden=(16,), sigmoid_units=4)  # fmt: skip
    vae = VAE(cfg).double()
    # briefly trained on 6-pixel images of 3 noisy patterns: the flow leaves its start
    patterns = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 1, 0]])
    gen = torch.Generator().manual_seed(0)
    pick = patterns[torch.randint(0, 3, (2000,), generator=gen)].double()
    flips = torch.bernoulli(torch.full(pick.shape, 0.1, dtype=torch.float64), generator=gen)
    images = (pick - flips).abs() * 16  # on the 17 levels fit_vae binarizes: exact 0 / 1
    with torch.enable_grad():
        fit_vae(vae, images, steps=200, batch_size=100, lr=1e-2, levels=17, progress=False)
    return vae.eval()


def _log_px(vae: VAE, x: torch.Tensor, lim: float = 7.0, n: int = 400) -> torch.Tensor:
    """log p(x) = log of the integral of p(x|z) N(z; 0, I) over a grid of z."""
    h = 2 * lim / n
    g = torch.linspace(-lim + h / 2, lim - h / 2, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    logits = vae.decoder(z)
    out = []
    for xi in x:
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, xi.expand_as(logits), reduction="none"
        ).sum(1)
        out.append(torch.logsumexp(log_lik + log_prior, 0) + 2 * math.log(h))
    return torch.stack(out)


@pytest.mark.parametrize("posterior", POSTERIORS)
@torch.no_grad()
def test_bounds_sit_below_log_px_and_tighten_with_k(posterior):
    vae = _tiny(posterior)
    x = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).double()
    truth = _log_px(vae, x)
    torch.manual_seed(1)
    reps = {k: torch.stack([vae.log_likelihood(x, k) for _ in range(100)]) for k in (1, 10, 100)}
    mean = {k: r.mean(0) for k, r in reps.items()}
    se = {k: r.std(0) / 10 for k, r in reps.items()}
    elbo = vae.elbo(x, k=2000)
    assert (elbo < truth).all()  # the gap is the posterior's KL to the true posterior
    assert ((mean[1] - elbo).abs() < 4 * se[1] + 0.02).all()  # K = 1 is the ELBO
    for a, b in ((1, 10), (10, 100)):  # increasing in K, in expectation
        assert (mean[b] > mean[a] - 3 * (se[a] + se[b])).all(), (a, b, mean[a], mean[b])
    big = torch.stack([vae.log_likelihood(x, k=1000) for _ in range(10)])
    big_mean, big_se = big.mean(0), big.std(0) / math.sqrt(10)
    # never above log p(x) in expectation (a single draw can overshoot: heavy-tailed
    # weights), and converging to it as K grows: log q(z|x) is a normalized density
    assert (big_mean < truth + 3 * big_se + 1e-3).all(), (big_mean, big_se, truth)
    assert (truth - big_mean < 0.03).all(), (big_mean, truth)


@torch.no_grad()
def test_importance_weighting_tightens_a_poor_posterior():
    """An untrained encoder's posterior is far from the true one: the bound rises
    clearly from K = 1 (the ELBO) to 10 to 100."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_size=6, latent=2, hidden=(16,), posterior="gaussian")).double()
    vae.encoder[-1].bias.data[2:4] = -2.0  # sigma ~ 0.14: far narrower than p(z | x)
    x = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).double()
    reps = {k: torch.stack([vae.log_likelihood(x, k) for _ in range(100)]) for k in (1, 10, 100)}
    mean = {k: float(r.mean()) for k, r in reps.items()}
    se = {k: float(r.mean(1).std()) / 10 for k, r in reps.items()}
    assert mean[10] > mean[1] + 3 * (se[1] + se[10])
    assert mean[100] > mean[10] + 3 * (se[10] + se[100])


def test_training_raises_the_elbo_and_evaluation_reports_both_bounds():
    data = load_data("digits")
    images, test = data.train.float(), binarize(data.test[:200].float(), 17,
                                                torch.Generator().manual_seed(0))  # fmt: skip
    cfg = VAEConfig(image_size=64, latent=4, hidden=(64,), context=8, posterior="iaf-dsf",
                    n_flows=1, flow_hidden=(32,), sigmoid_units=4)  # fmt: skip
    torch.manual_seed(0)
    vae = VAE(cfg)
    before = evaluate_vae(vae, test, k=20)
    history = fit_vae(vae, images, steps=150, batch_size=64, lr=3e-3, levels=17, progress=False)
    after = evaluate_vae(vae, test, k=20)
    assert len(history) == 150 and after.elbo > before.elbo + 5
    assert after.log_likelihood >= after.elbo and after.n == 200 and after.k == 20
    assert "ELBO" in str(after) and "K=20" in str(after)


def test_binarize_and_errors():
    gen = torch.Generator().manual_seed(0)
    x = binarize(torch.full((20000, 2), 4.0), levels=17, generator=gen)
    assert set(x.unique().tolist()) == {0.0, 1.0} and abs(float(x.mean()) - 0.25) < 0.01
    vae = VAE(VAEConfig(image_size=4, latent=2, hidden=(8,), posterior="gaussian"))
    with pytest.raises(ValueError, match="binary images"):
        vae.elbo(torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="expects 4 pixels"):
        vae.elbo(torch.zeros(2, 5))
    assert len(vae.flow) == 0  # the plain VAE has no flow
