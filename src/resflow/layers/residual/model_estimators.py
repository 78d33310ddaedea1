"""Swapping the evaluation estimators of every residual block of a model for one pass,
and the label of the biased figure a family reports beside the true one.

>>> import torch
>>> from resflow.layers.residual.block import ResidualBlock
>>> from resflow.layers.residual.logdet import EXACT_ESTIMATOR
>>> from resflow.nets import residual_mlp
>>> model = torch.nn.Sequential(ResidualBlock(residual_mlp(2, (8,))))
>>> with evaluation_estimators(model, lambda b: EXACT_ESTIMATOR) as blocks:
...     blocks[0].eval_estimator.method
'exact'
>>> biased_figure(model) is None
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from resflow.layers.residual.block import ResidualBlock
from resflow.layers.residual.logdet import LogdetEstimator


@contextmanager
def evaluation_estimators(
    model: nn.Module, choose: Callable[[ResidualBlock], LogdetEstimator]
) -> Iterator[list[ResidualBlock]]:
    """Every residual block of ``model`` evaluates with ``choose(block)`` inside the
    context (the exact logdet for a check, more Hutchinson vectors, the biased figure
    reported beside the true one); the blocks' own estimators are restored after it.
    Yields the blocks."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    saved = [b.eval_estimator for b in blocks]
    try:
        for b in blocks:
            b.eval_estimator = choose(b)
        yield blocks
    finally:
        for b, est in zip(blocks, saved):
            b.eval_estimator = est


def biased_figure(model: nn.Module) -> str | None:
    """A label for the biased figure ``model``'s residual blocks report beside the true
    one (:attr:`ResidualBlock.biased_estimator`), or ``None`` when they report none."""
    found = {
        m.biased_estimator
        for m in model.modules()
        if isinstance(m, ResidualBlock) and m.biased_estimator is not None
    }
    if not found:
        return None
    terms = "/".join(str(e.n_exact_terms) for e in sorted(found, key=lambda e: e.n_exact_terms))
    return f"biased: series truncated after {terms} terms, as the i-ResNet paper evaluates"
