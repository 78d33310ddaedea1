import pytest
import torch

from resflow.models.presets import PRESETS, get_preset
from resflow.models.residual_flow import (
    build_model,
    config_from_dict,
    config_to_dict,
    count_parameters,
)

PAPER = {
    "mnist": 16_608_693,
    "cifar10": 25_174_233,
    "imagenet32": 47_099_289,
    "imagenet64": 53_294_475,
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_have_the_authors_parameter_counts(name):
    assert count_parameters(build_model(get_preset(name))) == PAPER[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_plain_data(name):
    cfg = PRESETS[name]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_preset_and_option():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    bad = config_to_dict(PRESETS["mnist"]) | {"n_blockz": 3}
    with pytest.raises(ValueError, match="unknown ImageFlowConfig option"):
        config_from_dict(bad)


def test_factor_out_model_round_trip():
    cfg = get_preset(
        "imagenet64",
        image_shape=(3, 16, 16),
        n_blocks=(1, 1),
        hidden=8,
        fc_hidden=(8,),
        fc_blocks=1,
    )
    model = build_model(cfg).eval()
    x = torch.randint(0, 256, (2, 3, 16, 16))
    with torch.no_grad():
        z, logdet = model(x)
    assert z.shape == (2, 3 * 16 * 16) and torch.isfinite(logdet).all()
    torch.testing.assert_close(model.inverse(z), x.float())
