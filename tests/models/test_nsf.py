"""Neural spline flows: the presets hold the paper's tabular configurations and print the
paper's test log-likelihood of their variant beside resflow's; the families train."""

from __future__ import annotations

import pytest
import torch

from resflow.cli.common import report_benchmark
from resflow.evaluation import EvalResult
from resflow.models import PRESETS, build_model, count_parameters, get_preset
from resflow.models.nsf import PAPER_LOG_LIKELIHOOD, NSFConfig


@pytest.mark.parametrize("name", ["power", "gas", "hepmass", "miniboone", "bsds300"])
def test_tabular_presets_for_both_variants(name):
    c, ar = get_preset(f"nsf-c-{name}"), get_preset(f"nsf-ar-{name}")
    assert (c.transform, ar.transform) == ("coupling", "autoregressive")
    assert c.dim == ar.dim and c.n_flows == ar.n_flows and c.bins == ar.bins
    assert ar.dropout == 0.0  # the residual MADE has none
    for preset, kind in ((f"nsf-c-{name}", "coupling"), (f"nsf-ar-{name}", "autoregressive")):
        assert PAPER_LOG_LIKELIHOOD[(kind, name)] in PRESETS.get(preset).description
    assert get_preset("nsf-c-miniboone").bins == 4 and get_preset("nsf-c-power").hidden == 256


def test_the_paper_figure_of_the_variant_is_printed_beside_resflows(capsys):
    result = EvalResult(-0.5, 0.01, 100, "nats")
    report_benchmark("power", result, get_preset("nsf-ar-power"))
    out = capsys.readouterr().out
    assert "test log-likelihood 0.5000 +- 0.0100 nats (RQ-NSF (AR) in its paper: 0.66" in out
    report_benchmark("gas", result, get_preset("nsf-c-gas"))
    assert "RQ-NSF (C) in its paper: 13.09 +- 0.02" in capsys.readouterr().out
    report_benchmark("power", result, get_preset("maf-power"))  # no figure of its own
    assert "NAF-DDSF(5) in its paper" in capsys.readouterr().out
    report_benchmark("8gaussians", result, get_preset("nsf-toy2d"))
    assert capsys.readouterr().out == ""


def test_the_image_preset_counts_and_runs():
    assert count_parameters(build_model(get_preset("nsf-cifar10"))) == 12_752_082
    model = build_model(get_preset("nsf-digits"))
    x = torch.randint(0, 17, (4, 1, 8, 8))
    assert torch.isfinite(model.log_prob(x)).all()


def test_a_coupling_needs_two_features():
    from resflow.config import ConfigError

    with pytest.raises(ConfigError, match="a coupling needs dim >= 2"):
        NSFConfig(dim=1)
    assert build_model(NSFConfig(dim=1, transform="autoregressive", n_flows=2, hidden=8,
                                 blocks=1)).sample(3).shape == (3, 1)  # fmt: skip
