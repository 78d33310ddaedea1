"""Reverse KL: the gradient estimator against the closed form on Gaussians, convergence
to the known optimum, the sampling direction's densities, and the targets' claims."""

from __future__ import annotations

import math

import pytest
import torch

from resflow.flow import Flow
from resflow.layers.actnorm import ActNorm
from resflow.models import build_model, get_preset
from resflow.models.naf import MAFConfig
from resflow.vi import (
    TARGETS,
    ReverseKL,
    Target,
    estimate_kl,
    fit_reverse_kl,
    make_target,
    sampling_direction,
)
from resflow.vi.targets import grid_log_z

M_P, S_P = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])


def _gaussian_target() -> Target:
    def log_prob(x):  # type: ignore[no-untyped-def]
        s = S_P.to(x)
        return (-0.5 * ((x - M_P.to(x)) / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)).sum(1)

    return Target("gauss", 2, log_prob, log_z=0.0)


def _affine_q(bias=(1.5, -1.0), log_scale=(-0.5, 0.4)) -> Flow:  # type: ignore[no-untyped-def]
    layer = ActNorm(2)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor(bias))
        layer.log_scale.copy_(torch.tensor(log_scale))
        layer.initialized.fill_(True)
    return sampling_direction(Flow([layer], (2,)))  # x = (z + b) e^s


def _closed_form_kl(q: Flow) -> torch.Tensor:
    """KL(N(m_q, s_q^2) || N(m_p, s_p^2)) with m_q, s_q read off the sampling map."""
    zero, one = torch.zeros(1, 2), torch.ones(1, 2)
    m_q = q.layers.inverse(zero)[0]
    s_q = q.layers.inverse(one)[0] - m_q
    return (torch.log(S_P / s_q) + (s_q**2 + (m_q - M_P) ** 2) / (2 * S_P**2) - 0.5).sum()


def test_gradient_estimate_matches_the_closed_form():
    target = _gaussian_target()
    q = _affine_q()
    params = list(q.parameters())
    exact = torch.autograd.grad(_closed_form_kl(q), params)
    torch.manual_seed(0)
    grads = []
    for _ in range(200):
        loss, _ = ReverseKL(target, 100)(q)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
    exact_flat = torch.cat([e.flatten() for e in exact])
    assert ((mean - exact_flat).abs() < 4 * se + 1e-6).all(), (mean, exact_flat, se)
    # and the loss estimates the KL itself (log Z = 0)
    losses = torch.stack([ReverseKL(target, 1000)(q)[0].detach() for _ in range(50)])
    se_loss = float(losses.std()) / math.sqrt(len(losses))
    assert abs(float(losses.mean().detach()) - float(_closed_form_kl(q).detach())) < 4 * se_loss


def test_fit_reaches_the_known_optimum():
    target = _gaussian_target()
    q = _affine_q()
    fit_reverse_kl(q, target, steps=400, batch_size=256, lr=0.05, progress=False)
    m_q = q.layers.inverse(torch.zeros(1, 2))[0]
    s_q = q.layers.inverse(torch.ones(1, 2))[0] - m_q
    torch.testing.assert_close(m_q, M_P, atol=0.05, rtol=0)
    torch.testing.assert_close(s_q, S_P, atol=0.05, rtol=0.03)
    est = estimate_kl(q, target, 4000)
    assert est.kl is not None and abs(est.kl) < 0.01 and est.ess > 0.98


def test_kl_is_zero_when_q_is_the_target():
    q = _affine_q(bias=(2.0, -1.0), log_scale=(math.log(0.5), math.log(2.0)))  # (z + b) e^s
    est = estimate_kl(q, _gaussian_target(), 3000)
    assert est.kl is not None and abs(est.kl) < 1e-5 and abs(est.log_z) < 1e-5
    assert est.ess == pytest.approx(1.0, abs=1e-6)


def test_sampling_direction_densities_agree_with_the_density_direction():
    """An IAF drawn in one pass; its log q equals the density computed by the MAF's
    inverse (D passes): both directions describe one distribution."""
    torch.manual_seed(0)
    maf = build_model(MAFConfig(dim=3, n_flows=2, hidden=(16,))).double()
    with torch.no_grad():
        for p in maf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    iaf = sampling_direction(maf)
    x, log_q = iaf.sample_and_log_prob(7)
    torch.testing.assert_close(iaf.log_prob(x), log_q, atol=1e-8, rtol=1e-8)
    z = maf.base.sample(5, 1.0, None).double()
    torch.testing.assert_close(iaf.inverse(z), maf.layers(z)[0])
    with pytest.raises(ValueError, match="latent has the data's shape"):
        sampling_direction(build_model(get_preset("digits-small")))


@pytest.mark.parametrize("preset", ["naf-toy2d", "realnvp-toy2d", "toy2d"])
def test_every_kind_of_flow_fits_by_reverse_kl(preset):
    """Autoregressive, coupling and residual flows: gradients reach every trainable
    parameter and a few steps lower the loss on the banana."""
    torch.manual_seed(0)
    q = sampling_direction(build_model(get_preset(preset)))
    target = make_target("banana")
    loss, _ = ReverseKL(target, 128)(q)
    loss.backward()
    for name, p in q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    history = fit_reverse_kl(q, target, steps=30, batch_size=64, lr=3e-3, progress=False)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first


def test_targets_are_what_they_claim():
    for name in ("ring-mixture", "banana", "two-moons"):
        t = make_target(name)
        lim = 14.0 if name == "banana" else 8.0
        assert grid_log_z(t.log_prob, lim, 1200) == pytest.approx(t.log_z, abs=2e-3), name
    banana = make_target("banana").sample(200_000)
    assert abs(float(banana[:, 1].mean())) < 0.02  # E[x1^2 / 4 - 1] = 0
    funnel = make_target("funnel", dim=5)
    v = funnel.sample(100_000)[:, 0]
    assert abs(float(v.var()) - 9.0) < 0.15 and funnel.dim == 5
    assert torch.isfinite(funnel(funnel.sample(100))).all()
    assert sorted(TARGETS.names()) == ["banana", "funnel", "ring-mixture", "two-moons"]
    with pytest.raises(ValueError, match="2-D"):
        make_target("banana", dim=3)
    with pytest.raises(ValueError, match="cannot be sampled"):
        make_target("two-moons").sample(3)
    with pytest.raises(ValueError, match=r"expects \[N, 2\]"):
        make_target("banana")(torch.zeros(3, 4))


def test_annealing_raises_beta_to_one_then_fits_the_target():
    target = _gaussian_target()
    q = _affine_q()
    history = fit_reverse_kl(q, target, steps=400, batch_size=256, lr=0.05, progress=False,
                             anneal=200, beta0=0.1)  # fmt: skip
    betas = [h["beta"] for h in history]
    assert betas[0] == pytest.approx(0.1) and betas[100] == pytest.approx(0.55)
    assert all(b == 1.0 for b in betas[200:]) and "kl" not in history[0] and "kl" in history[-1]
    est = estimate_kl(q, target, 4000)
    assert est.kl is not None and abs(est.kl) < 0.01
    with pytest.raises(ValueError, match="beta0"):
        fit_reverse_kl(q, target, steps=1, beta0=0.0)


def test_the_command_line_fits_with_the_library_defaults():
    """`resflow vi` states no default of its own: each comes from ReverseKLConfig."""
    import inspect

    from resflow.cli.parser import build_parser
    from resflow.vi import ReverseKLConfig

    args = build_parser().parse_args(["vi", "--target", "banana"])
    defaults = ReverseKLConfig()
    for name in ("steps", "batch_size", "lr", "anneal", "n_eval", "seed"):
        assert getattr(args, name) == getattr(defaults, name), name
    signature = inspect.signature(fit_reverse_kl).parameters
    for name in ("steps", "batch_size", "lr", "grad_clip", "anneal", "beta0", "seed"):
        assert signature[name].default == getattr(defaults, name), name
