"""DenseFlow models: DenseFlow-74-10 has the authors' 130,647,294 parameters (built on
the meta device); the structure of DenseFlow-L-k; its dequantizer's ``log q``; the
importance-weighted bound grows with K; `resflow train / eval --iw-samples / sample`
end to end (in-process, a few steps)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from resflow.cli import main
from resflow.config import ConfigError
from resflow.evaluation import evaluate_bounds
from resflow.layers.augment import DenseAugmentedBlock, NoiseAugmentation
from resflow.layers.coupling import Coupling
from resflow.layers.multiscale import FactorOut
from resflow.models import build_model, count_parameters, get_preset
from resflow.models.denseflow import (
    DenseDequantizationConfig,
    DenseFlowConfig,
    build_dense_dequantizer,
)
from resflow.nets.denseflow import DenseAttentionNet
from resflow.preprocess import UniformDequantizer, VariationalDequantizer
from test_contract import MODELS_TINY

from helpers import brute_logdet

REFERENCE = 130_647_294  # DenseFlow-74-10 (the authors' code, CIFAR-10 and ImageNet)
DEQUANTIZER = 2_395_784  # of which its variational dequantizer


def _meta(cfg):  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        return build_model(cfg)


@pytest.mark.parametrize("name", ["denseflow-cifar10", "denseflow-imagenet32",
                                  "denseflow-imagenet64"])  # fmt: skip
def test_denseflow_74_10_has_the_authors_parameter_count(name):
    cfg = get_preset(name)
    assert cfg.n_modules == 74 and cfg.growth == 10
    model = _meta(cfg)
    assert count_parameters(model) == REFERENCE
    assert count_parameters(model.layers[0]) == DEQUANTIZER
    assert isinstance(model.layers[0], VariationalDequantizer)
    # the authors' Nyström attention: one head, 4 landmarks, in every coupling net
    assert cfg.attention == "authors" and cfg.heads == 1 and cfg.landmarks == 4
    nets = [m for m in model.modules() if isinstance(m, DenseAttentionNet)]
    assert len(nets) == 74
    assert all(n.attention.form == "authors" and n.attention.heads == 1 for n in nets)


def test_denseflow_74_10_structure():
    model = _meta(get_preset("denseflow-cifar10"))
    blocks = [m for m in model.modules() if isinstance(m, DenseAugmentedBlock)]
    assert [len(b.units) for b in blocks] == [6, 4, 1]
    augs = [m for m in model.modules() if isinstance(m, NoiseAugmentation)]
    assert len(augs) == 5 + 3 and all(a.growth == 10 for a in augs)
    couplings = [m for m in model.layers[1:].modules() if isinstance(m, Coupling)]
    assert len(couplings) == 74
    assert len([m for m in model.modules() if isinstance(m, FactorOut)]) == 2
    # channels: 12 after the squeeze, +10 per unit; 62 -> squeeze, half: 124; 154 -> 308
    assert [b.output_shape(s) for b, s in zip(blocks, [(12, 16, 16), (124, 8, 8), (308, 4, 4)])] \
        == [(62, 16, 16), (154, 8, 8), (308, 4, 4)]  # fmt: skip
    assert model.latent_shape == (62 * 16 * 16 // 2 + 154 * 8 * 8 // 2 + 308 * 16,)


def test_small_presets_and_config_errors():
    for name in ("denseflow-digits", "denseflow-mnist"):
        cfg = get_preset(name)
        assert isinstance(build_model(cfg).layers[0], UniformDequantizer)
    with pytest.raises(ConfigError, match="one number per block"):
        DenseFlowConfig(units=(2, 2), modules=(1,), hidden=(8, 8))
    with pytest.raises(ConfigError, match="heads: 5 must divide"):
        DenseFlowConfig(heads=5)
    with pytest.raises(ConfigError, match="heads: the authors' Nyström attention has one head"):
        DenseFlowConfig(attention="authors", heads=4)
    # a run saved before the field existed reloads with the attention it was trained with
    assert DenseFlowConfig().attention == "textbook"
    with pytest.raises(ConfigError, match="choose one dequantizer"):
        replace(get_preset("denseflow-cifar10"), dequantization=replace(
            get_preset("flowpp-digits").dequantization))  # fmt: skip
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model(DenseFlowConfig(image_shape=(1, 12, 12), units=(1, 1, 1), modules=(1, 1, 1),
                                    hidden=(8, 8, 8), heads=1))  # fmt: skip


def _perturb(module: torch.nn.Module, scale: float, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


TINY_DEQ = DenseDequantizationConfig(enabled=True, couplings=2, hidden=6, depth=1, growth=4,
                                     context=4, context_depth=1, context_growth=4)  # fmt: skip


def test_dense_dequantizer_log_q_is_the_density_of_its_noise():
    deq = build_dense_dequantizer(TINY_DEQ, 5, (1, 4, 4)).double()
    x = torch.randint(0, 5, (3, 1, 4, 4)).double()
    deq(x)
    _perturb(deq, 0.2)
    torch.manual_seed(3)
    u, log_q = deq.noise(x)
    torch.manual_seed(3)
    eps, log_base = deq.sample_base(x)
    assert ((u >= 0) & (u < 1)).all()
    for i in range(len(x)):
        feats = deq.features(x[i : i + 1])

        def to_u(e, feats=feats):  # type: ignore[no-untyped-def]
            return torch.sigmoid(deq.flow(e, feats)[0]), None

        ld = brute_logdet(to_u, eps[i : i + 1])
        torch.testing.assert_close(log_q[i], log_base[i] - ld[0], atol=1e-8, rtol=1e-8)
    model = build_model(replace(MODELS_TINY["denseflow"](), dense_dequantization=TINY_DEQ))
    assert isinstance(model.layers[0], VariationalDequantizer)
    logp = model.log_prob(torch.randint(0, 17, (4, 1, 4, 4)))
    (-logp.mean()).backward()  # trained jointly with the flow
    assert all(p.grad is not None for p in model.layers[0].parameters())


def test_importance_weighted_bound_increases_with_k():
    torch.manual_seed(0)
    model = build_model(MODELS_TINY["denseflow"]())
    model(torch.randint(0, 17, (64, 1, 4, 4)))  # ActNorm initialisation
    _perturb(model, 0.3)  # non-trivial cross-unit couplings (they start at sigma=1, mu=0)
    model.eval()
    data = torch.randint(0, 17, (1, 1, 4, 4)).repeat(200, 1, 1, 1)  # MC noise only
    results = {}
    for k in (1, 4, 32):
        torch.manual_seed(k)
        results[k] = evaluate_bounds(model, data, k=k, batch_size=4096)
    assert abs(results[1].iw.mean - results[1].elbo.mean) < 1e-9
    for a, b in ((1, 4), (4, 32)):
        drop = results[a].iw.mean - results[b].iw.mean
        assert drop > 3 * math.hypot(results[a].iw.stderr, results[b].iw.stderr)
    assert results[32].iw.mean < results[32].elbo.mean


@pytest.mark.parametrize("attention", ["textbook", "authors"])
def test_round_trip_error_of_an_augmented_model_is_small(attention):
    cfg = replace(MODELS_TINY["denseflow"](), attention=attention, heads=1)
    model = build_model(cfg).eval()
    model(torch.randint(0, 17, (8, 1, 4, 4)))
    _perturb(model, 0.1)  # non-zero coupling nets: the attention is used
    z = model.sample_latent(5)
    assert float(model.round_trip_error(z).max()) < 1e-4


def test_train_denseflow_evaluate_the_bounds_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--set", "units=[2,1]", "--set", "modules=[1,1]", "--set", "hidden=[8,8]",
            "--set", "dense_depth=1", "--set", "dense_growth=4"]  # fmt: skip
    code = main(["train", "--data", "digits", "--model", "denseflow", *tiny, "--steps", "2",
                 "--batch-size", "16", "--eval-every", "2", "--n-samples", "4", "--out",
                 str(run), "--no-progress", "--no-tensorboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "denseflow-digits" in out and "bits/dim" in out
    code = main(["eval", "--run", str(run), "--max", "16", "--iw-samples", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "variational bound" in out and "importance-weighted bound, K=4" in out
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(run), "--n", "4", "--check", "--out", str(png)]) == 0
    assert png.exists()
    code = main(["train", "--data", "digits", "--preset", "denseflow-digits", *tiny, "--steps",
                 "1", "--batch-size", "8", "--eval-every", "1", "--eval-max", "8",
                 "--n-samples", "2", "--out", str(tmp_path / "p"), "--no-progress",
                 "--no-tensorboard"])  # fmt: skip
    assert code == 0
