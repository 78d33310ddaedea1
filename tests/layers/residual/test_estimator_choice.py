"""Which estimator a residual block evaluates with: the true log-density always (exact
for small blocks, unbiased otherwise), a biased paper figure only beside it."""

import math

import pytest
import torch

from resflow.evaluation import evaluate
from resflow.layers.residual.block import ResidualBlock
from resflow.layers.residual.logdet import AUTO_EXACT_MAX_DIM, EstimatorConfig, LogdetEstimator
from resflow.layers.residual.model_estimators import biased_figure, evaluation_estimators
from resflow.models import build_model, get_preset

from helpers import brute_logdet, strong_block


def _eval_logdets(block, x, n):
    block.eval()
    with torch.no_grad():
        return torch.stack([block(x)[1] for _ in range(n)])


def test_auto_is_the_exact_logdet_for_small_blocks():
    block = strong_block(3, seed=2)
    assert block.eval_estimator.method == "auto"
    x = torch.randn(5, 3)
    draws = _eval_logdets(block, x, 3)
    torch.testing.assert_close(draws[0], draws[1], atol=0, rtol=0)  # no estimation noise
    torch.testing.assert_close(draws[0], brute_logdet(block, x), atol=1e-5, rtol=1e-5)


def test_auto_is_the_unbiased_series_above_the_threshold():
    d = AUTO_EXACT_MAX_DIM + 2
    block = strong_block(d, seed=3)
    x = torch.randn(1, d).repeat(8, 1)
    assert block.estimator_for(x).method == "series"
    draws = _eval_logdets(block, x, 200).mean(1)
    assert draws.std() > 0  # a random estimate
    exact = brute_logdet(block, x[:1])[0]
    assert abs(draws.mean() - exact) < 4 * draws.std() / math.sqrt(len(draws))


def test_a_truncated_evaluation_is_refused_and_the_biased_figure_is_separate():
    with pytest.raises(ValueError, match="biased"):
        EstimatorConfig(eval_dist="none")
    cfg = EstimatorConfig(n_exact_terms=5, dist="none", biased_eval_terms=5)
    train, ev = cfg.estimators()
    assert train.biased and not ev.biased and ev.dist == "poisson"
    assert cfg.biased_estimator() == LogdetEstimator(
        n_exact_terms=5, dist="none", neumann_grad=False, grad_in_forward=False
    )
    assert EstimatorConfig().biased_estimator() is None


def test_evaluation_estimators_restores_the_blocks_own():
    block = strong_block(2)
    own = block.eval_estimator
    with pytest.raises(RuntimeError):
        with evaluation_estimators(block, lambda b: LogdetEstimator(method="exact")) as blocks:
            assert blocks == [block] and block.eval_estimator.method == "exact"
            raise RuntimeError
    assert block.eval_estimator is own


def _strong_iresnet(seed: int = 0):
    """A 2-D i-ResNet whose branches are far from linear, so the truncated series is off."""
    torch.manual_seed(seed)
    model = build_model(get_preset("iresnet-toy2d", n_blocks=2, hidden=(8,)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) or hasattr(m, "weight"):
                if getattr(m, "weight", None) is not None and m.weight.dim() == 2:
                    m.weight.mul_(10)
    return model


def test_iresnet_log_prob_is_its_true_density_and_its_paper_figure_is_labelled():
    model = _strong_iresnet()
    x = torch.randn(64, 2) * 2
    result = evaluate(model, x)
    assert model.training  # the caller's mode restored
    (label,) = result.extra
    assert label == biased_figure(model) and "biased" in label and "5 terms" in label

    model.eval()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    with torch.no_grad():
        log_p = model.log_prob(x)
    # the true density: base + the dense Jacobian's slogdet of the whole flow
    with torch.no_grad():
        z, _ = model(x)
    exact = (model.base.log_prob(z) + brute_logdet(model.layers, x)).detach()
    torch.testing.assert_close(log_p, exact, atol=1e-4, rtol=1e-5)
    assert abs(result.mean - float(-exact.double().mean())) < 1e-4
    # the labelled figure is the 5-term series (biased: see test_logdet's truncation test)
    assert all(b.biased_estimator.n_exact_terms == 5 for b in blocks)
    with evaluation_estimators(model, lambda b: b.biased_estimator), torch.no_grad():
        truncated = torch.stack([model.log_prob(x) for _ in range(20)]).mean(0)
    assert not torch.allclose(truncated, exact, atol=1e-4)
    assert abs(result.extra[label].mean - float(-truncated.double().mean())) < 0.05
