"""Evaluation's edges: the caller's mode survives an error, flows without parameters
are evaluated, second figures are printed with their label, and the residual blocks'
Hutchinson vectors can be raised for one evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from resflow.distributions import StandardNormal
from resflow.evaluation import (
    EvalResult,
    evaluate,
    evaluate_bounds,
    hutchinson_vectors,
    is_stochastic,
    model_device,
    per_example,
    per_example_draws,
)
from resflow.flow import Flow
from resflow.layers import ResidualBlock
from resflow.layers.residual.logdet import EXACT_ESTIMATOR, LogdetEstimator
from resflow.nets import residual_mlp
from resflow.preprocess import LogitTransform, UniformDequantizer

SERIES = LogdetEstimator(n_exact_terms=20, neumann_grad=False, grad_in_forward=False)


class _BufferlessNormal(nn.Module):
    """``N(0, I)`` with neither parameters nor buffers."""

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return -0.5 * (z.pow(2) + 1.8378770664093453).flatten(1).sum(1)


def _fixed_flow(base: nn.Module | None = None) -> Flow:
    """Dequantization and logit only: a flow without parameters."""
    shape = (1, 2, 2)
    return Flow([UniformDequantizer(17), LogitTransform(0.05)], shape, base=base, levels=17)


def _residual_flow(d: int = 24, estimator: LogdetEstimator = SERIES) -> Flow:
    torch.manual_seed(0)
    blocks = [ResidualBlock(residual_mlp(d, (32,), coeff=0.9), eval_estimator=estimator)
              for _ in range(2)]  # fmt: skip
    return Flow(blocks, (d,), base=StandardNormal((d,)))


@pytest.mark.parametrize("base", ["buffers", "nothing"])
def test_a_flow_without_parameters_is_evaluated(base):
    model = _fixed_flow(StandardNormal((1, 2, 2)) if base == "buffers" else _BufferlessNormal())
    assert not list(model.parameters())
    assert model_device(model) == torch.device("cpu")
    x = torch.randint(0, 17, (10, 1, 2, 2))
    torch.manual_seed(0)
    result = evaluate(model, x, batch_size=4)
    assert result.n == 10 and result.unit == "bits/dim" and 0 < result.mean < 10
    bounds = evaluate_bounds(model, x, k=3, batch_size=6)
    assert bounds.iw.mean <= bounds.elbo.mean


@pytest.mark.parametrize("which", ["evaluate", "evaluate_bounds", "per_example_draws"])
def test_the_callers_mode_is_restored_when_evaluation_fails(which):
    model = _fixed_flow(StandardNormal((1, 2, 2)))
    model.train()
    bad = torch.full((3, 1, 2, 2), 99)  # not levels of a 17-level model
    call = {
        "evaluate": lambda: evaluate(model, bad),
        "evaluate_bounds": lambda: evaluate_bounds(model, bad, k=2),
        "per_example_draws": lambda: per_example_draws(model, bad, 2),
    }[which]
    with pytest.raises(ValueError, match="integer levels"):
        call()
    assert model.training and all(m.training for m in model.modules())


def test_a_second_figure_is_printed_with_its_label():
    biased = EvalResult(1.15, 0.0123, 64, "bits/dim")
    label = "biased (i-ResNet's 5-term truncated series, as its paper reports)"
    result = EvalResult(1.2, 0.01, 64, "bits/dim", extra={label: biased})
    text = str(result)
    assert text.startswith("1.2000 +- 0.0100 bits/dim (n=64)")
    assert text.endswith(f"; {label}: 1.1500 +- 0.0123 bits/dim")
    assert str(EvalResult(1.2, 0.01, 64, "bits/dim")) == "1.2000 +- 0.0100 bits/dim (n=64)"
    assert "; " not in str(EvalResult(1.2, float("nan"), 1, "nats"))


def test_hutchinson_vectors_are_raised_for_the_block_and_restored():
    model = _residual_flow()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    with hutchinson_vectors(model, 8):
        assert [b.eval_estimator.n_hutchinson for b in blocks] == [8, 8]
        assert blocks[0].eval_estimator.n_exact_terms == 20  # the rest is kept
    assert [b.eval_estimator for b in blocks] == [SERIES, SERIES]
    with pytest.raises(RuntimeError), hutchinson_vectors(model, 4):
        raise RuntimeError
    assert [b.eval_estimator for b in blocks] == [SERIES, SERIES]
    fixed = _fixed_flow()
    with pytest.raises(ValueError, match="no residual blocks"), hutchinson_vectors(fixed, 2):
        pass


def test_more_hutchinson_vectors_give_less_noisy_draws():
    model = _residual_flow()
    x = torch.randn(8, 24)
    torch.manual_seed(1)
    one = per_example_draws(model, x, 6)
    with hutchinson_vectors(model, 8):
        torch.manual_seed(1)
        many = per_example_draws(model, x, 6)
    spread_one, spread_many = one.std(1).mean(), many.std(1).mean()  # about 1 / sqrt(8)
    assert float(spread_one) > 0 and float(spread_many) < 0.6 * float(spread_one)
    torch.testing.assert_close(many.mean(1), one.mean(1), atol=float(4 * spread_one), rtol=0)


def test_draws_per_example_and_stochastic_models():
    exact = _residual_flow(6, EXACT_ESTIMATOR)
    assert not is_stochastic(exact) and is_stochastic(_residual_flow(6))
    auto = LogdetEstimator(method="auto", n_exact_terms=20)  # exact up to 16 dimensions
    assert not is_stochastic(_residual_flow(6, auto)) and is_stochastic(_residual_flow(24, auto))
    assert is_stochastic(_fixed_flow())  # dequantization noise
    x = torch.randn(5, 6)
    draws = per_example_draws(exact, x, 3)
    assert draws.shape == (5, 3) and draws.dtype == torch.float64
    assert torch.equal(draws[:, 0], draws[:, 2])  # a deterministic model repeats itself
    x = torch.randn(7, 24)
    a, b = _residual_flow(24), _residual_flow(24)  # fresh: a use refreshes Lipschitz bounds
    torch.manual_seed(3)
    first = per_example_draws(a, x, 1, batch_size=3)[:, 0]
    torch.manual_seed(3)
    assert torch.equal(first, per_example(b, x, batch_size=3))
    with pytest.raises(ValueError, match="draws per example must be >= 1"):
        per_example_draws(_residual_flow(24), x, 0)
