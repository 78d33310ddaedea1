"""Scoring and the likelihood bounds against by-hand formulas: every evaluation runs the
model in eval mode (a batch-norm flow scores with its running statistics, leaves them
as they were and gets its mode back), the importance-weighted bound is Burda et al.'s
``log (1/K) sum_k exp(l_k)`` of K draws *of the same example*, and bits/dim divide by
``D ln 2``."""

from __future__ import annotations

import math

import torch

from resflow.evaluation import evaluate, evaluate_bounds, per_example
from resflow.flow import Flow
from resflow.layers.actnorm import ElementActNorm
from resflow.layers.batchnorm import BatchNormFlow
from resflow.preprocess import LogitTransform, UniformDequantizer
from resflow.scoring import score


def _batchnorm_model() -> Flow:
    """A deterministic vector model whose log-density differs between training mode
    (batch statistics, and the running averages move) and eval mode."""
    torch.manual_seed(0)
    model = Flow([BatchNormFlow(3), ElementActNorm((3,))], (3,))
    model(torch.randn(64, 3) * 2 + 1)  # initialisation
    with torch.no_grad():
        model.layers.layers[0].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.layers.layers[0].running_var.copy_(torch.tensor([4.0, 0.25, 1.5]))
    return model


def _reference_nll(model: Flow, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = -model.log_prob(x).double()
    model.train(was)
    return out


def _stats(model: Flow) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


def test_scoring_and_evaluation_use_eval_mode_and_restore_it():
    model = _batchnorm_model()
    x = torch.randn(10, 3) * torch.tensor([3.0, 0.2, 1.0])
    ref = _reference_nll(model, x)
    for training in (True, False):
        model.train(training)
        before = _stats(model)
        for fn in (per_example, score):
            values = fn(model, x, batch_size=4)
            if not isinstance(values, torch.Tensor):  # score's Scores: the mean of draws
                values = values.values
            torch.testing.assert_close(values, ref)
        assert abs(evaluate(model, x, batch_size=4).mean - float(ref.mean())) < 1e-9
        bounds = evaluate_bounds(model, x, k=3, batch_size=6)
        # deterministic: every draw is the same, so both bounds are the log-likelihood
        assert abs(bounds.elbo.mean - float(ref.mean())) < 1e-9
        assert abs(bounds.iw.mean - float(ref.mean())) < 1e-9
        assert model.training is training
        for a, b in zip(before, _stats(model)):
            assert torch.equal(a, b)  # the running statistics were not touched


def _stochastic_model() -> Flow:
    levels, shape = 5, (1, 2, 3)
    torch.manual_seed(1)
    model = Flow(
        [UniformDequantizer(levels), LogitTransform(0.05), ElementActNorm(shape)],
        shape,
        levels=levels,
    )
    model(torch.randint(0, levels, (32, *shape)))
    return model.double()


def test_bounds_are_the_formulas_of_their_draws():
    model = _stochastic_model()
    d = 6
    x = torch.randint(0, 5, (7, 1, 2, 3))
    x[0] = 0  # distinct examples (a mixed-up grouping would show)
    x[1] = 4
    k = 4
    torch.manual_seed(3)
    result = evaluate_bounds(model, x, k=k, batch_size=1024)
    torch.manual_seed(3)
    with torch.no_grad():
        logp = model.eval().log_prob(x.repeat_interleave(k, 0)).view(7, k)
    elbo = -logp.mean(1) / (d * math.log(2))
    iw = -(torch.logsumexp(logp, 1) - math.log(k)) / (d * math.log(2))
    assert abs(result.elbo.mean - float(elbo.mean())) < 1e-9
    assert abs(result.iw.mean - float(iw.mean())) < 1e-9
    assert abs(result.iw.stderr - float(iw.std() / math.sqrt(7))) < 1e-9
    # K = 1 with the same draws: the bits/dim of evaluate
    torch.manual_seed(5)
    one = evaluate_bounds(model, x, k=1, batch_size=1024)
    torch.manual_seed(5)
    plain = per_example(model, x, batch_size=1024)
    assert abs(one.iw.mean - float(plain.mean())) < 1e-9
    assert abs(one.elbo.mean - float(plain.mean())) < 1e-9
    torch.manual_seed(5)
    with torch.no_grad():
        by_hand = -model.log_prob(x).double() / (d * math.log(2))
    torch.testing.assert_close(plain, by_hand)
    torch.manual_seed(5)
    with torch.no_grad():
        torch.testing.assert_close(model.bits_per_dim(x).double(), by_hand)
