"""Hybrid models: the classifier reads the flow's representation (paper section 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from resflow.data import DataConfig, load_data
from resflow.layers.multiscale import Flatten
from resflow.layers.residual.block import ResidualBlock
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.models import build_model, get_preset
from resflow.models.hybrid import HybridFlow, find_taps
from resflow.preprocess import LogitTransform, Normalize
from resflow.runs import RunFolder
from resflow.training import Batch, TrainConfig, Trainer
from resflow.training.objectives import Hybrid, MaximumLikelihood, default_objective

TINY = dict(n_blocks=(1, 1), hidden=8, head_channels=8)


def _model(**kw):
    torch.manual_seed(0)
    return build_model(get_preset("hybrid-digits", **{**TINY, **kw}))


def _batch(n=16):
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randint(0, 17, (n, 1, 8, 8), generator=g), torch.arange(n) % 10)


def _block_weights(model):
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and n.endswith("weight") and "layers." in n
            and any(isinstance(m, ResidualBlock) for m in [_owner(model, n)])]  # fmt: skip


def _owner(model, name):
    """The residual block a parameter belongs to (or None)."""
    parts, m, block = name.split(".")[:-1], model, None
    for part in parts:
        m = getattr(m, part)
        if isinstance(m, ResidualBlock):
            block = m
    return block


def _tail(model):
    """Parameters of the residual blocks after the flatten (the fully connected tail)."""
    after, params = False, []
    for m in model.layers.modules():
        after = after or isinstance(m, Flatten)
        if after and isinstance(m, ResidualBlock):
            params += [p for p in m.parameters() if p.requires_grad]
    return params


def test_classifier_taps_every_squeeze_and_the_end():
    model = _model()
    taps = find_taps(model.layers, model.shape)
    # 8x8 digits, 2 scales: after the squeeze between them (4x4x4) and at the end (4x4x4)
    assert [(w, s) for _, w, s in taps] == [("output", (4, 4, 4)), ("input", (4, 4, 4))]
    log_p, logits = model.log_prob_and_logits(_batch().x)
    assert log_p.shape == (16,) and logits.shape == (16, 10)
    torch.manual_seed(3)
    a = model.log_prob(_batch().x)
    torch.manual_seed(3)
    torch.testing.assert_close(model.log_prob_and_logits(_batch().x)[0], a)


def test_classification_gradients_reach_the_flow_blocks():
    model = _model()
    _, logits = model.log_prob_and_logits(_batch().x)
    F.cross_entropy(logits, _batch().labels).backward()
    weights = _block_weights(model)
    assert len(weights) >= 6  # 3 convolutions in each of the 2 blocks
    for name, p in weights:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lambda_zero_is_a_pure_classifier():
    # the fully connected tail after the last tap only serves the density
    model = _model(fc_end=True, fc_blocks=1, fc_hidden=(8,), density_weight=0.0)
    assert model.lam == 0
    objective = default_objective(model)
    assert isinstance(objective, Hybrid)
    batch = _batch()
    torch.manual_seed(1)
    loss, metrics = objective(model, batch)
    torch.manual_seed(1)
    _, logits = model.log_prob_and_logits(batch.x)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch.labels))
    loss.backward()
    tail = _tail(model)
    assert tail, "expected the fully connected tail's block"
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tail)
    assert set(metrics) == {"bpd", "xent", "acc"}

    dense = _model(fc_end=True, fc_blocks=1, fc_hidden=(8,), density_weight=1.0)
    assert dense.lam == pytest.approx(1 / 64)  # per dimension by default: the paper's 1/D
    loss, _ = Hybrid(dense)(dense, batch)
    loss.backward()
    tail = _tail(dense)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tail)


def test_lambda_zero_training_learns_to_classify_and_eval_reports_accuracy(tmp_path):
    cheap = EstimatorConfig(n_exact_terms=1, eval_exact_terms=1, dist="none")  # not the point
    cfg = get_preset("hybrid-digits", **TINY, density_weight=0.0, estimator=cheap)
    data = load_data(DataConfig(name="digits"))
    train = TrainConfig(steps=80, batch_size=64, lr=1e-2, warmup=1, eval_every=80, eval_max=150,
                        tensorboard=False, progress=False, ema_decay=0.0)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is several times faster
    try:
        final = Trainer(cfg, data, train, tmp_path / "run").fit().final
    finally:
        torch.set_num_threads(threads)
    assert final is not None and final.accuracy is not None
    assert final.accuracy > 0.5, final  # chance is 0.1
    assert "accuracy" in str(final)
    model = RunFolder(tmp_path / "run").load_model()
    assert isinstance(model, HybridFlow) and model.lam == 0


def test_objective_errors_and_normalization():
    model = _model()
    with pytest.raises(ValueError, match="needs labelled training data"):
        Hybrid(model)(model, Batch(_batch().x))
    with pytest.raises(ValueError, match="label 10 is out of range"):
        Hybrid(model)(model, Batch(_batch().x, torch.full((16,), 10)))
    assert isinstance(default_objective(build_model(get_preset("digits-small"))), MaximumLikelihood)
    cifar = build_model(get_preset("hybrid-cifar10", n_blocks=(1, 1, 1), hidden=4, head_channels=4))
    kinds = [type(m) for m in cifar.layers.layers]
    assert Normalize in kinds and LogitTransform not in kinds
    assert cifar.lam == pytest.approx(1 / (3 * 32 * 32))
    assert math.isclose(cifar.heads[0].conv.out_channels, 4)
