"""MAF and NAF models: structure, the autoregressive Jacobian of a whole model, presets,
and NAF beating MAF on the grid of Gaussians (the NAF paper's 2-D experiment)."""

from __future__ import annotations

import math

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


def test_maf_and_naf_bound_their_maps_far_from_the_data_unless_set_to_the_papers():
    maf = build_model(MAFConfig(dim=2, n_flows=2, hidden=(8,)))
    layers = [layer for layer in maf.layers if isinstance(layer, Autoregressive)]
    assert [layer.transformer.clamp for layer in layers] == [3.0, 3.0]
    paper = build_model(MAFConfig(dim=2, n_flows=1, hidden=(8,), scale_clamp=0))
    assert paper.layers[0].transformer.clamp is None
    for kind in ("ddsf", "dsf"):
        naf = build_model(NAFConfig(dim=2, n_flows=1, hidden=(8,), transformer=kind))
        t = naf.layers[0].transformer
        assert (t.bound, t.slope_floor) == (8.0, 0.1)
        cfg = NAFConfig(
            dim=2, n_flows=1, hidden=(8,), transformer=kind, param_bound=0, slope_floor=0
        )
        t = build_model(cfg).layers[0].transformer
        assert (t.bound, t.slope_floor) == (None, 0.0)


def test_sigmoidal_slope_floor_keeps_extreme_parameters_invertible_in_float32():
    """With conditioned parameters far beyond those seen on data (as a MADE gives far
    from it), the paper's DDSF has plateaus of slope ~e^-32 that no float32 bisection
    inverts; soft-clamped parameters and the slope floor keep dy/dx >= 0.1 and the round
    trip at float32 resolution on [-100, 100]."""
    torch.manual_seed(0)
    x = torch.linspace(-100, 100, 401).repeat(6, 1)
    gen = torch.Generator().manual_seed(3)
    errors = {}
    for name, kw in {"paper": {}, "bounded": {"bound": 8.0, "slope_floor": 0.1}}.items():
        t = DDSF(8, 2, **kw)
        params = 30 * torch.randn(6, t.n_params, 1, generator=gen.manual_seed(3))
        params = params.expand(-1, -1, x.shape[1])
        with torch.no_grad():
            y, logdet = t(x, params)
            x_rec, _ = t.inverse(y, params)
        errors[name] = float(((x_rec - x).abs() / (1 + x.abs())).max())
        if name == "bounded":
            assert float(logdet.min()) >= math.log(0.1) - 1e-5
    assert errors["paper"] > 0.1 and errors["bounded"] < 1e-4, errors


def test_sigmoidal_logdet_with_bound_and_slope_floor_is_the_log_derivative():
    torch.manual_seed(0)
    for t in (DDSF(5, 2, bound=4.0, slope_floor=0.2), DSF(4, bound=4.0, slope_floor=0.2)):
        t = t.double()
        x = 5 * torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
        params = 6 * torch.randn(7, t.n_params, 3, dtype=torch.float64)
        y, logdet = t(x, params)
        (dy,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(logdet, dy.log(), atol=1e-10, rtol=1e-10)
        assert "bound=4.0, slope_floor=0.2" in repr(t)
    with pytest.raises(ValueError, match="bound must be positive"):
        DSF(4, bound=0.0)
    with pytest.raises(ValueError, match="slope_floor must be >= 0"):
        DDSF(4, 2, slope_floor=-0.1)


@pytest.mark.parametrize(
    ("preset", "fields", "paper"),
    [
        ("maf-toy2d", ("scale_clamp",), (0.0,)),
        ("naf-toy2d", ("param_bound", "slope_floor"), (0.0, 0.0)),
    ],
)
def test_checkpoints_written_before_the_bounds_reload_with_the_papers_maps(preset, fields, paper):
    from resflow.models import get_preset
    from resflow.models.registry import config_from_dict, config_to_dict

    saved = config_to_dict(get_preset(preset))
    now = config_from_dict(saved)
    assert all(getattr(now, f) > 0 for f in fields)  # written with the bounds: kept
    for f in fields:
        del saved["config"][f]  # an older checkpoint's config
    old = config_from_dict(saved)
    assert tuple(getattr(old, f) for f in fields) == paper
