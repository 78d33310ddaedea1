"""The residual block's computation paths (``ResidualBlock(path=...)``): every forced path
gives the output, logdet and gradients of the general path (autograd products,
backpropagated through the estimate) in float64, ``"auto"`` takes the path it reports,
and forcing a path that cannot serve the pass raises a clear ``ValueError``."""

import pytest
import torch
from torch import nn

from resflow.layers import ResidualBlock
from resflow.layers.residual import fused
from resflow.layers.residual.logdet import (
    BLOCK_PATHS,
    EVAL_ESTIMATOR,
    EstimatorConfig,
    LogdetEstimator,
)
from resflow.nets import residual_cnn, residual_mlp

EXACT = LogdetEstimator(method="exact")
SERIES = LogdetEstimator(method="series", n_exact_terms=3, n_hutchinson=2)
#: the authors' toy script: a geometric roulette, backpropagated through the series
THROUGH = LogdetEstimator(dist="geometric", neumann_grad=False, grad_in_forward=False)
CLOSE = dict(rtol=1e-9, atol=1e-11)


def _dense(estimator: LogdetEstimator) -> tuple[ResidualBlock, torch.Tensor]:
    torch.manual_seed(0)
    g = residual_mlp(2, (8, 8), coeff=0.9).double()
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ResidualBlock(g, train_estimator=estimator), torch.randn(6, 2, dtype=torch.float64)


def _wide(estimator: LogdetEstimator) -> tuple[ResidualBlock, torch.Tensor]:
    """A dense branch on more dimensions than the fused path takes."""
    torch.manual_seed(0)
    d = fused.MAX_DIM + 1
    g = residual_mlp(d, (8, 8), coeff=0.9).double()
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ResidualBlock(g, train_estimator=estimator), torch.randn(6, d, dtype=torch.float64)


def _conv(estimator: LogdetEstimator) -> tuple[ResidualBlock, torch.Tensor]:
    torch.manual_seed(0)
    g = residual_cnn(1, 4, coeff=0.9).double()
    block = ResidualBlock(g, train_estimator=estimator)
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        block(x)  # the convolutions learn their input size
    return block, x


def _train(block: ResidualBlock, x: torch.Tensor, path: str) -> list[torch.Tensor]:
    """Output, logdet and the gradients of a loss for ``x`` and every parameter, with
    the same random draws for every path."""
    block.path = path
    block.zero_grad()
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    y, logdet = block(xg)
    (y.pow(2).sum() - logdet.sum()).backward()
    grads = [xg.grad] + [p.grad for p in block.g.parameters() if p.requires_grad]
    return [y.detach(), logdet.detach(), *grads]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **CLOSE)


@pytest.mark.parametrize(
    "build, estimator, path",
    [
        (_dense, EXACT, "fused"),
        (_dense, SERIES, "fused"),
        (_dense, THROUGH, "fused"),
        (_dense, EXACT, "closed_form"),
        (_dense, EXACT, "in_forward"),
        (_dense, SERIES, "closed_form"),
        (_dense, SERIES, "in_forward"),
        (_conv, EXACT, "closed_form"),
        (_conv, SERIES, "closed_form"),
        (_conv, SERIES, "in_forward"),
    ],
)
def test_a_forced_training_path_equals_the_general_path(build, estimator, path):
    block, x = build(estimator)
    _assert_same(_train(block, x, path), _train(block, x, "autograd"))


@pytest.mark.parametrize("build", [_dense, _conv])
def test_the_graph_free_path_equals_the_general_path(build):
    block, x = build(SERIES)
    block.eval()
    with torch.no_grad():
        outs = {}
        for path in ("graph_free", "autograd"):
            block.path = path
            torch.manual_seed(7)
            outs[path] = block(x)
    _assert_same(list(outs["graph_free"]), list(outs["autograd"]))


@pytest.mark.parametrize(
    "build, estimator, grad, want",
    [
        (_dense, EXACT, True, "fused"),
        (_dense, SERIES, True, "fused"),
        (_dense, THROUGH, True, "fused"),
        (_wide, SERIES, True, "closed_form"),
        (_conv, EXACT, True, "closed_form"),
        (_wide, LogdetEstimator(neumann_grad=False), True, "in_forward"),
        (_wide, LogdetEstimator(grad_in_forward=False), True, "autograd"),
        (_dense, SERIES, False, "graph_free"),
        (_conv, SERIES, False, "graph_free"),
    ],
)
def test_auto_takes_the_path_it_reports(build, estimator, grad, want):
    """``"auto"`` reports the path of today's choice, and its numbers are those of that
    path forced (bit for bit: the same computation)."""
    block, x = build(estimator)
    with torch.set_grad_enabled(grad):
        assert block.path == "auto" and block.choose_path(x.clone().requires_grad_(grad)) == want
    if grad:
        _assert_exact(_train(block, x, "auto"), _train(block, x, want))
    else:
        with torch.no_grad():
            torch.manual_seed(7)
            auto = block(x)
            block.path = want
            torch.manual_seed(7)
            _assert_exact(list(auto), list(block(x)))


def _assert_exact(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_auto_without_known_derivatives_takes_autograd():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(2, 2), nn.Tanh()).double()
    block = ResidualBlock(g)
    x = 0.1 * torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert block.choose_path(x) == "in_forward"
    with torch.no_grad():
        assert block.choose_path(x) == "autograd"


@pytest.mark.parametrize(
    "build, estimator, path, grad, match",
    [
        (_wide, SERIES, "fused", True, "dense spectral-norm layers"),
        (_conv, EXACT, "fused", True, "dense spectral-norm layers"),
        (_dense, LogdetEstimator(neumann_grad=False), "closed_form", True, "neumann_grad=False"),
        (_dense, SERIES, "graph_free", True, "computes no gradients"),
    ],
)
def test_a_path_that_cannot_apply_is_refused(build, estimator, path, grad, match):
    block, x = build(estimator)
    block.path = path
    with pytest.raises(ValueError, match=match):
        block(x.clone().requires_grad_(grad))


def test_paths_that_need_known_derivatives_are_refused_for_other_branches():
    g = nn.Sequential(nn.Linear(2, 2), nn.Tanh()).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    for path in ("closed_form", "graph_free"):
        block = ResidualBlock(g, path=path)
        with torch.no_grad(), pytest.raises(ValueError, match="known derivatives"):
            block(x)


def test_the_setting_is_checked_and_travels_from_the_config():
    with pytest.raises(ValueError, match="unknown block path"):
        ResidualBlock(residual_mlp(2, (4,)), path="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EstimatorConfig(path="fastest")  # type: ignore[arg-type]
    assert EstimatorConfig().path == "auto" and set(BLOCK_PATHS) >= {"auto", "fused"}
    block = ResidualBlock.from_config(residual_mlp(2, (4,)), EstimatorConfig(path="autograd"))
    assert block.path == "autograd" and "path='autograd'" in repr(block)
    assert "path" not in ResidualBlock(residual_mlp(2, (4,))).extra_repr()
    assert block.eval_estimator == EVAL_ESTIMATOR
