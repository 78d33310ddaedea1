"""MAF and NAF models: structure, the autoregressive Jacobian of a whole model, presets,
and NAF beating MAF on the grid of Gaussians (the NAF paper's 2-D experiment)."""

from __future__ import annotations

import pytest
import torch

from resflow.config import replace
from resflow.data import load_data
from resflow.data.tabular_benchmarks import BENCHMARKS
from resflow.data.toy2d import toy_entropy
from resflow.layers.autoregressive import Autoregressive
from resflow.layers.batchnorm import BatchNormFlow
from resflow.layers.permutation import Reverse
from resflow.layers.sigmoidal import DDSF, DSF
from resflow.layers.transformers import Affine
from resflow.models import PRESETS, build_model, get_preset
from resflow.models.naf import MAFConfig, NAFConfig
from resflow.training import Trainer

from helpers import brute_logdet


def test_layers_alternate_orders_and_transformers():
    maf = build_model(MAFConfig(dim=3, n_flows=3, hidden=(8,), batch_norm=True))
    kinds = [type(layer).__name__ for layer in maf.layers]
    assert kinds == ["Autoregressive", "BatchNormFlow", "Reverse"] * 2 + ["Autoregressive"]
    assert all(isinstance(layer.transformer, Affine) for layer in maf.layers
               if isinstance(layer, Autoregressive))  # fmt: skip
    naf = build_model(NAFConfig(dim=3, n_flows=2, hidden=(8,), transformer="dsf"))
    assert isinstance(naf.layers[0].transformer, DSF) and isinstance(naf.layers[1], Reverse)
    ddsf = build_model(NAFConfig(dim=3, n_flows=1, hidden=(8,), sigmoid_layers=3))
    assert isinstance(ddsf.layers[0].transformer, DDSF) and ddsf.layers[0].transformer.layers == 3
    rand = build_model(MAFConfig(dim=5, n_flows=2, hidden=(8,), order="random"))
    orders = [layer.order.tolist() for layer in rand.layers]
    assert orders[0] != orders[1] and not any(isinstance(x, BatchNormFlow) for x in rand.layers)


SMALL = [
    MAFConfig(dim=4, n_flows=3, hidden=(16,)),
    NAFConfig(dim=4, n_flows=2, hidden=(16,), sigmoid_units=4),
]


@pytest.mark.parametrize("cfg", SMALL)
def test_model_density_and_sampling_are_exact(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).double()
    with torch.no_grad():  # leave the zero-initialised start
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 4, dtype=torch.float64)
    z, logdet = model.layers(x)
    torch.testing.assert_close(logdet, brute_logdet(model.layers, x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(model.layers.inverse(z), x, atol=1e-8, rtol=1e-8)
    samples, log_q = model.sample_and_log_prob(6)
    torch.testing.assert_close(log_q, model.log_prob(samples), atol=1e-7, rtol=1e-7)


def test_tabular_presets_fit_their_benchmarks():
    for name, bench in BENCHMARKS.items():
        for family in ("naf", "maf"):
            preset = PRESETS.get(f"{family}-{name}")
            assert preset.config.dim == bench.dim and name in preset.default_for
            assert preset.train.patience > 0  # early stopping on the validation split
    assert get_preset("naf-power").n_flows == 5


def test_naf_beats_maf_on_the_grid_of_gaussians(tmp_path):
    """Same number of steps, batch and data (the benchmark compares equal wall-clock):
    NAF's test NLL is closer to the grid's entropy (4.2677 nats) than MAF's, and
    neither is implausibly below it."""
    data = load_data("grid", n_train=10_000, n_test=4000)
    limit = toy_entropy("grid")
    results = {}
    for preset in ("naf-toy2d", "maf-toy2d"):
        train = replace(PRESETS.get(preset).train, steps=300, batch_size=256, eval_every=10**9,
                        checkpoint_every=10**9, tensorboard=False, progress=False)  # fmt: skip
        result = Trainer(get_preset(preset), data, train, tmp_path / preset).fit().final
        assert result is not None
        assert result.mean > limit - 4 * result.stderr
        results[preset] = result.mean
    assert results["naf-toy2d"] < results["maf-toy2d"] - 0.03, results
