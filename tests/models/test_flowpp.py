"""Flow++ models and variational dequantization for every image family: builds, the
config errors, one option to switch any image model (``dequantization.kind``, the
``--dequantization`` flag), and `resflow train --model flowpp` end to end (in-process,
a few steps)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from resflow.cli import main
from resflow.config import ConfigError, override
from resflow.layers.coupling import Coupling
from resflow.layers.logistic_mixture import LogisticMixtureCDF
from resflow.layers.transformers import Affine
from resflow.models import MODELS, build_model, get_preset
from resflow.models.dequantization import DequantizationConfig
from resflow.models.flowpp import FlowppConfig
from resflow.preprocess import UniformDequantizer, VariationalDequantizer
from test_contract import MODELS_TINY

SMALL_DEQ = DequantizationConfig(
    kind="variational", couplings=1, hidden=8, blocks=1, components=2, heads=2,
    context_hidden=4, context_blocks=1,
)  # fmt: skip
IMAGE_MODELS = sorted(
    name for name, e in MODELS.items() if e.kind == "image" and name in MODELS_TINY
)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_image_model_takes_variational_dequantization(name):
    cfg = MODELS_TINY[name]()
    assert isinstance(build_model(replace(cfg, dequantization=DequantizationConfig())).layers[0],
                      UniformDequantizer)  # fmt: skip
    cfg = override(cfg, {"dequantization.kind": "variational", "dequantization.hidden": 8,
                         "dequantization.heads": 2, "dequantization.couplings": 1})  # fmt: skip
    model = build_model(cfg)
    deq = model.layers[0]
    assert isinstance(deq, VariationalDequantizer)
    x = torch.randint(0, model.levels, (4, *model.shape))
    logp = model.log_prob(x)
    assert torch.isfinite(logp).all()
    (-logp.mean()).backward()  # trained jointly: the gradient reaches the dequantizer
    assert all(p.grad is not None for p in deq.parameters())


def test_flowpp_structure_and_ablations():
    cfg = replace(MODELS_TINY["flowpp"](), dequantization=SMALL_DEQ)
    couplings = [m for m in build_model(cfg).modules() if isinstance(m, Coupling)]
    assert len(couplings) == 3 + 1  # (1, 1, 1) steps and the dequantizer's one
    assert all(isinstance(c.transformer, LogisticMixtureCDF) for c in couplings)
    affine = build_model(replace(cfg, coupling="affine"))
    kinds = {type(m.transformer) for m in affine.modules() if isinstance(m, Coupling)}
    assert kinds == {Affine, LogisticMixtureCDF}  # the dequantizer keeps its own choice
    assert get_preset("flowpp-cifar10-uniform").dequantization.kind == "uniform"
    assert get_preset("flowpp-cifar10-affine").coupling == "affine"
    assert not get_preset("flowpp-cifar10-noattn").attention
    assert get_preset("flowpp-cifar10").dequantization.kind == "variational"
    conditional = build_model(replace(cfg, n_classes=3))  # the nets see the one-hot label
    x, y = torch.randint(0, 17, (4, 1, 4, 4)), torch.tensor([0, 1, 2, 0])
    assert torch.isfinite(conditional.log_prob(x, y)).all()


def test_config_errors():
    with pytest.raises(ConfigError, match="couplings: expected 3 numbers"):
        FlowppConfig(couplings=(4, 2))
    with pytest.raises(ValueError, match="width divisible by 4"):
        build_model(FlowppConfig(image_shape=(1, 6, 6), couplings=(1, 1, 1), hidden=8, blocks=1))


def test_train_flowpp_and_evaluate_the_bounds(tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--set", "hidden=8", "--set", "blocks=1", "--set", "components=2",
             "--set", "heads=2", "--set", "couplings=[1,1,1]"]  # fmt: skip
    code = main(["train", "--data", "digits", "--model", "flowpp", *small, "--steps", "2",
                 "--batch-size", "16", "--eval-every", "2", "--n-samples", "4", "--out",
                 str(run), "--no-progress", "--no-tensorboard",
                 "--dequantization", "uniform"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "flowpp-digits" in out and "bits/dim" in out
    assert "kind: uniform" in (run / "config.yaml").read_text()  # the flag overrides the preset
    code = main(["eval", "--run", str(run), "--max", "16", "--iw-samples", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "variational bound" in out and "importance-weighted bound, K=4" in out
