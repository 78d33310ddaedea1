"""Variational dequantization: forced to uniform it is uniform dequantization; its
``log q(u | x)`` is the density of its noise; the importance-weighted bound is above the
variational bound, grows with K, and neither exceeds the exact discrete
log-likelihood of a small model whose probabilities are computed by quadrature."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from resflow.distributions import StandardNormal
from resflow.evaluation import evaluate, evaluate_bounds
from resflow.flow import Flow
from resflow.layers.base import Sequential
from resflow.layers.coupling import ColumnMask, Coupling
from resflow.layers.logistic_mixture import LogisticMixtureCDF
from resflow.models import build_model
from resflow.models.dequantization import ColumnConcat, DequantizationConfig, build_dequantizer
from resflow.models.glow import GlowConfig
from resflow.nets.flowpp import FlowppNet
from resflow.preprocess import LogitTransform, UniformDequantizer, VariationalDequantizer

from helpers import brute_logdet

TINY_DEQ = DequantizationConfig(
    kind="variational", couplings=2, hidden=8, blocks=1, components=3, heads=2,
    context_hidden=4, context_blocks=1,
)  # fmt: skip


def _perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _zero_coupling() -> Coupling:
    """A logistic-mixture coupling whose zero-initialised net makes it the identity."""
    t = LogisticMixtureCDF(3)
    return Coupling(ColumnMask(), FlowppNet(1, t.n_params, (4, 2), hidden=8, blocks=1,
                                            heads=2, context_channels=2), t)  # fmt: skip


@pytest.mark.parametrize("flow", ["identity", "zero-coupling"])
def test_forced_to_uniform_it_reproduces_the_uniform_bits_per_dim(flow):
    cfg = GlowConfig(image_shape=(1, 4, 4), levels=17, n_levels=2, depth=1, hidden=8)
    uniform = build_model(cfg)
    x = torch.randint(0, 17, (8, 1, 4, 4))
    uniform(x)  # ActNorm initialisation
    noise_flow = Sequential() if flow == "identity" else Sequential(_zero_coupling())
    processor = None if flow == "identity" else ColumnConcat()
    variational = build_model(cfg)
    variational.layers.layers[0] = VariationalDequantizer(17, noise_flow, processor, "logistic")
    missing, unexpected = variational.load_state_dict(uniform.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layers.layers.0.") for k in missing)
    uniform.eval(), variational.eval()
    torch.manual_seed(5)
    a = uniform.bits_per_dim(x)
    torch.manual_seed(5)
    b = variational.bits_per_dim(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.manual_seed(6)
    ea = evaluate(uniform, x)
    torch.manual_seed(6)
    eb = evaluate(variational, x)
    assert abs(ea.mean - eb.mean) < 1e-5


def test_log_q_is_the_density_of_the_noise():
    """``log q(u | x) = log p_base(eps) - log|det du/deps|``: against the brute-force
    Jacobian of ``eps -> u`` for a perturbed dequantizer."""
    deq = build_dequantizer(TINY_DEQ, 5, (1, 2, 4)).double()
    x = torch.randint(0, 5, (3, 1, 2, 4)).double()
    deq(x)  # ActNorm initialisation
    _perturb(deq)
    torch.manual_seed(3)
    u, log_q = deq.noise(x)
    torch.manual_seed(3)
    eps, log_base = deq.sample_base(x)
    assert ((u >= 0) & (u < 1)).all()
    for i in range(len(x)):
        feats = deq.features(x[i : i + 1])

        def to_u(e, feats=feats):  # type: ignore[no-untyped-def]
            h, _ = deq.flow(e, feats)
            return torch.sigmoid(h), None

        ld = brute_logdet(to_u, eps[i : i + 1])
        torch.testing.assert_close(log_q[i], log_base[i] - ld[0], atol=1e-8, rtol=1e-8)


def _toy(seed: int = 0) -> Flow:
    """Two dimensions with 3 levels: a (perturbed) variational dequantizer, logit and a
    standard normal."""
    torch.manual_seed(seed)
    deq = build_dequantizer(TINY_DEQ, 3, (1, 1, 2))
    model = Flow([deq, LogitTransform(0.05)], (1, 1, 2), base=StandardNormal((1, 1, 2)), levels=3)
    model(torch.randint(0, 3, (64, 1, 1, 2)))  # ActNorm initialisation
    _perturb(deq, 0.1, seed)
    return model.double()


def _exact_log_probs(model: Flow, grid: int = 400) -> torch.Tensor:
    """``log P(x)`` of the 9 discrete values: the continuous model integrated over each
    bin by the midpoint rule."""
    mid = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    u = torch.cartesian_prod(mid, mid).view(-1, 1, 1, 2)
    body = Sequential(list(model.layers.layers[1:]))
    out = []
    for x in itertools.product(range(3), repeat=2):
        y = (torch.tensor(x, dtype=torch.float64).view(1, 1, 1, 2) + u) / 3
        z, logdet = body(y)
        logp = model.base.log_prob(z) + logdet - 2 * math.log(3)
        out.append(torch.logsumexp(logp, 0) - math.log(len(u)))
    return torch.stack(out)


def _all_values() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(3), repeat=2))).view(9, 1, 1, 2)


@torch.no_grad()
def test_bounds_never_exceed_the_exact_discrete_log_likelihood():
    model = _toy().eval()
    exact = _exact_log_probs(model)
    assert float(exact.exp().sum()) < 1.0  # the logit's alpha leaves mass outside [0, 1]
    x = _all_values().repeat_interleave(2000, 0).double()
    torch.manual_seed(0)
    logp = model.log_prob(x).view(9, 2000)
    elbo, elbo_se = logp.mean(1), logp.std(1) / math.sqrt(2000)
    assert (elbo <= exact + 3 * elbo_se).all()
    gap = exact - elbo  # KL(q || posterior) > 0: the perturbed q is not the posterior
    assert (gap > 10 * elbo_se).all()
    # K = 200 importance samples, 10 replicates: E[IW_K] <= log P, and close to it
    iw = torch.logsumexp(logp.view(9, 10, 200), 2) - math.log(200)
    iw_mean, iw_se = iw.mean(1), iw.std(1) / math.sqrt(10)
    assert (iw_mean <= exact + 3 * iw_se + 1e-4).all()
    assert ((exact - iw_mean) < 0.6 * gap).all()  # and well above the variational bound
    # uniform dequantization, a special case: below log P, and its IW bound converges
    # to it (which also checks the quadrature)
    uniform = _toy()
    uniform.layers.layers[0] = UniformDequantizer(3)
    uniform.eval()
    lu = uniform.log_prob(x).view(9, 2000)
    assert (lu.mean(1) <= exact + 3 * lu.std(1) / math.sqrt(2000)).all()
    iw_u = torch.logsumexp(lu.view(9, 10, 200), 2).mean(1) - math.log(200)
    assert ((iw_u - exact).abs() < 0.05).all()


def test_importance_weighted_bound_is_above_the_variational_bound_and_grows_with_k():
    model = _toy().float()
    for value in ([0, 2], [1, 1]):
        data = torch.tensor(value).view(1, 1, 1, 2).repeat(300, 1, 1, 1)  # MC noise only
        results = {}
        for k in (1, 4, 32):
            torch.manual_seed(k)
            results[k] = evaluate_bounds(model, data, k=k, batch_size=4096)
        for k, r in results.items():
            assert r.iw.mean <= r.elbo.mean  # in bits/dim: lower is a higher bound
            assert r.iw.unit == "bits/dim" and r.iw.n == 300 and r.k == k
        assert abs(results[1].iw.mean - results[1].elbo.mean) < 1e-9  # K = 1: the same
        # E[IW_K] grows with K (bits/dim fall) by more than the noise of the estimates
        for a, b in ((1, 4), (4, 32)):
            drop = results[a].iw.mean - results[b].iw.mean
            assert drop > 3 * math.hypot(results[a].iw.stderr, results[b].iw.stderr)
        # the variational bound does not depend on K (the same expectation)
        e1, e32 = results[1].elbo, results[32].elbo
        assert abs(e1.mean - e32.mean) < 4 * math.hypot(e1.stderr, e32.stderr)


def test_build_dequantizer_and_errors():
    assert isinstance(build_dequantizer(DequantizationConfig(), 256, (3, 4, 4)), UniformDequantizer)
    deq = build_dequantizer(replace(TINY_DEQ, base="logistic"), 256, (3, 4, 4))
    assert isinstance(deq, VariationalDequantizer) and deq.base == "logistic"
    with pytest.raises(ValueError, match="even width"):
        build_dequantizer(TINY_DEQ, 256, (1, 4, 5))
    with pytest.raises(ValueError, match="unknown base"):
        VariationalDequantizer(4, Sequential(), base="gumbel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="importance samples must be >= 1"):
        evaluate_bounds(_toy(), _all_values(), k=0)
