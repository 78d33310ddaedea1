import math

import pytest
import torch

from resflow.layers import EXACT_ESTIMATOR, LogdetEstimator, truncated_estimator
from resflow.layers.residual import fused
from resflow.layers.residual.logdet import draw_terms, survival

from helpers import assert_same_grads, grads_by_read_path, strong_block


def _exact(block, x):
    block.train_estimator = EXACT_ESTIMATOR
    with torch.no_grad():
        return block(x)[1]


def _draws(block, x, est, n_calls):
    """One value per forward call: a call shares its roulette draw across the batch."""
    block.train_estimator = est
    with torch.no_grad():
        return torch.stack([block(x)[1].mean() for _ in range(n_calls)])


@pytest.mark.parametrize("d", [2, 10])
@pytest.mark.parametrize("dist", ["geometric", "poisson"])
def test_roulette_is_unbiased_and_truncation_is_not(d, dist):
    block = strong_block(d, seed=1)
    x = torch.randn(1, d).repeat(20, 1)
    exact = _exact(block, x)[0]
    vals = _draws(block, x, LogdetEstimator(dist=dist), 1000)
    se = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean() - exact) < 3 * se
    biased = _draws(block, x, truncated_estimator(2), 1000)
    se_b = biased.std() / math.sqrt(len(biased))
    assert abs(biased.mean() - exact) > 5 * se_b


def test_exact_estimator_matches_slogdet():
    from helpers import brute_logdet

    block = strong_block(3, seed=2)
    x = torch.randn(4, 3)
    block.train_estimator = EXACT_ESTIMATOR
    torch.testing.assert_close(block(x)[1], brute_logdet(block, x), atol=1e-5, rtol=1e-5)


def test_twenty_exact_terms_give_the_eval_estimate_with_tiny_variance():
    block = strong_block(2, seed=1).eval()
    x = torch.randn(6, 2)
    exact = _exact(block.train(), x)
    block.eval()
    block.eval_estimator = LogdetEstimator(n_exact_terms=20, n_hutchinson=64)
    with torch.no_grad():
        est = torch.stack([block(x)[1] for _ in range(20)]).mean(0)
    torch.testing.assert_close(est, exact, atol=0.05, rtol=0)


def test_survival_and_weights():
    assert survival(2, 2, "geometric", 0.5, 2.0) == 1.0
    assert survival(4, 2, "geometric", 0.5, 2.0) == pytest.approx(0.5)
    assert survival(3, 2, "poisson", 0.5, 2.0) == pytest.approx(1 - math.exp(-2))
    assert survival(3, 2, "none", 0.5, 2.0) == 0.0
    n, w = draw_terms(5, "none", 0.5, 2.0)
    assert n == 5 and w == [1.0] * 6
    torch.manual_seed(3)
    counts = [draw_terms(2, "geometric", 0.5, 2.0)[0] - 2 for _ in range(4000)]
    assert sum(counts) / len(counts) == pytest.approx(2.0, abs=0.1)  # E[Geom(0.5)] = 2


def _grads(block, x, est, seed):
    block.train_estimator = est
    block.zero_grad()
    torch.manual_seed(seed)
    block(x)[1].mean().backward()
    return torch.cat([p.grad.flatten() for p in block.g.parameters() if p.grad is not None])


@pytest.mark.parametrize("neumann", [True, False])
def test_series_gradient_matches_exact_gradient_on_average(neumann):
    block = strong_block(2, seed=1)
    x = torch.randn(8, 2)
    exact = _grads(block, x, EXACT_ESTIMATOR, 0)
    est = LogdetEstimator(dist="geometric", neumann_grad=neumann, grad_in_forward=False)
    draws = torch.stack([_grads(block, x, est, s) for s in range(1000)])
    # the logdet does not depend on the last layer's bias: a gradient of 0 in every draw
    fixed = draws.std(0) == 0
    assert torch.equal(draws[0, fixed], exact[fixed])
    z = (draws.mean(0) - exact)[~fixed] / (draws.std(0)[~fixed] / math.sqrt(len(draws)))
    assert z.abs().max() < 4


@pytest.mark.parametrize("neumann", [True, False])
def test_backward_in_forward_gives_identical_gradients(neumann):
    block = strong_block(4, seed=3)
    x = torch.randn(5, 4, requires_grad=True)
    outs = []
    for in_forward in (False, True):
        est = LogdetEstimator(dist="poisson", neumann_grad=neumann, grad_in_forward=in_forward)
        block.train_estimator = est
        block.zero_grad()
        x.grad = None
        torch.manual_seed(7)
        y, logdet = block(x)
        (y.pow(2).sum(1) - logdet).mean().backward()
        outs.append([x.grad.clone()] + [p.grad.clone() for p in block.g.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_backward_in_forward_refuses_per_sample_weights():
    """(The fused path of small dense branches takes them: tests/layers/residual/test_fused.py.)"""
    d = fused.MAX_DIM + 1
    block = strong_block(d)
    x = torch.randn(3, d)
    _, logdet = block(x)
    with pytest.raises(RuntimeError, match="same upstream gradient"):
        (logdet * torch.tensor([1.0, 2.0, 3.0])).sum().backward()


def test_per_sample_weights_work_without_backward_in_forward():
    block = strong_block(2)
    block.train_estimator = LogdetEstimator(grad_in_forward=False)
    _, logdet = block(torch.randn(3, 2))
    (logdet * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    weights = [m.weight for m in block.g if hasattr(m, "weight")]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


def test_estimator_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown roulette distribution"):
        LogdetEstimator(dist="binomial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown logdet method"):
        LogdetEstimator(method="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_hutchinson"):
        LogdetEstimator(n_hutchinson=0)


@pytest.mark.parametrize("activation", ["lipswish", "elu", "softplus"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_closed_form_neumann_gradient_equals_autograd(kind, activation):
    """Backward-in-forward uses the closed-form Neumann gradient; the autograd Neumann
    path (without backward-in-forward) must give the same gradients for the same draws."""
    from resflow.layers import ResidualBlock
    from resflow.nets import residual_cnn, residual_mlp

    torch.manual_seed(5)
    if kind == "mlp":
        g = residual_mlp(3, (8, 8), coeff=0.9, activation=activation)
        x = torch.randn(4, 3, requires_grad=True)
    else:
        g = residual_cnn(2, 6, coeff=0.9, activation=activation)
        x = torch.randn(3, 2, 5, 5, requires_grad=True)
    block = ResidualBlock(g)
    with torch.no_grad():
        for p in block.g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    block(x)
    outs = []
    for in_forward in (False, True):
        block.train_estimator = LogdetEstimator(n_hutchinson=2, grad_in_forward=in_forward)
        block.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        y, logdet = block(x)
        (y.pow(2).flatten(1).sum(1) - logdet).mean().backward()
        outs.append([x.grad.clone()] + [p.grad for p in block.g.parameters()])
    for a, b in zip(*outs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("activation", ["lipswish", "elu"])
@pytest.mark.parametrize("kind", ["mlp2", "mlp3", "cnn"])
def test_closed_form_exact_gradient_equals_autograd(kind, activation):
    """The exact logdet's backward-in-forward gradient (pairs ``(e_j, (I + J)^{-T} e_j)``,
    the 2x2 inverse in closed form, stacked rows for vectors) equals autograd through
    ``slogdet`` of the brute-force Jacobian, for the logdet alone and with ``g(x)``."""
    from resflow.layers import ResidualBlock
    from resflow.nets import residual_cnn, residual_mlp

    torch.manual_seed(5)
    if kind.startswith("mlp"):
        d = int(kind[-1])
        g = residual_mlp(d, (8, 8), coeff=0.9, activation=activation).double()
        x = torch.randn(4, d, dtype=torch.float64)
    else:
        g = residual_cnn(1, 6, coeff=0.9, activation=activation).double()
        x = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    block = ResidualBlock(g)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    block(x)
    for logdet_only in (True, False):
        outs = []
        for in_forward in (False, True):
            block.train_estimator = LogdetEstimator(method="exact", grad_in_forward=in_forward)
            block.zero_grad()
            xg = x.clone().requires_grad_(True)
            y, logdet = block(xg)
            loss = -logdet.mean() if logdet_only else (y.pow(2).flatten(1).sum(1) - logdet).mean()
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in g.parameters()]
            outs.append((logdet.detach(), [xg.grad, *grads]))
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-12, rtol=1e-10)
        for a, b in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("method", ["exact", "series"])
def test_accelerator_backward_waits_once_and_gives_the_same_gradients(monkeypatch, method):
    """Where reading the device is not free, the closed-form backward scales the pairs'
    terms by the upstream gradient instead of reading it, and queues the uniformity
    check to the end of the backward pass: the gradients equal the host-reading path's
    for a logdet that is used, unused, or weighted by zero, and per-sample weights
    still raise, once the pass ends."""
    from resflow.layers import ResidualBlock
    from resflow.layers.residual import in_forward
    from resflow.nets import residual_mlp

    torch.manual_seed(5)
    d = fused.MAX_DIM + 1  # wider than the fused path takes: the closed form
    g = residual_mlp(d, (8, 8), coeff=0.9).double()
    block = ResidualBlock(g)
    block.train_estimator = LogdetEstimator(method=method)
    x = torch.randn(6, d, dtype=torch.float64)
    block(x)
    losses = {
        "both": lambda y, ld: (y.pow(2).sum(1) - ld).mean(),
        "logdet only": lambda y, ld: -ld.sum(),
        "unused logdet": lambda y, ld: y.pow(2).mean(),
        "zero weight": lambda y, ld: y.pow(2).mean() + 0.0 * ld.mean(),
    }
    for name, loss_fn in losses.items():
        assert_same_grads(*grads_by_read_path(monkeypatch, block, x, loss_fn), msg=name)
    _, ld = block(x)
    with pytest.raises(RuntimeError, match="same upstream gradient"):
        (ld * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
    assert not in_forward._pending
