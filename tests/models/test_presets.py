import pytest
import torch

from resflow.config import ConfigError
from resflow.models import (
    MODELS,
    PRESETS,
    build_model,
    config_from_dict,
    config_to_dict,
    count_parameters,
    default_preset,
    get_preset,
    resolve_model,
)

PAPER = {
    "mnist": 16_608_693,
    "cifar10": 25_174_233,
    "imagenet32": 47_099_289,
    "imagenet64": 53_294_475,
    # Flow++: the counts in the authors' code (flows/run_cifar.py, flows/ablations/)
    "flowpp-cifar10": 31_443_440,
    "flowpp-cifar10-uniform": 32_324_408,
    "flowpp-cifar10-affine": 32_045_708,
    "flowpp-cifar10-noattn": 31_443_440,
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_have_the_authors_parameter_counts(name):
    assert count_parameters(build_model(get_preset(name))) == PAPER[name]


@pytest.mark.parametrize("name", PRESETS.names())
def test_config_round_trips_through_plain_data(name):
    cfg = PRESETS.get(name).config
    data = config_to_dict(cfg)
    assert data["model"] == PRESETS.get(name).model
    assert config_from_dict(data) == cfg


def test_unknown_preset_and_option():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    bad = config_to_dict(get_preset("mnist"))
    bad["config"]["n_blockz"] = 3
    with pytest.raises(ConfigError, match="unknown option n_blockz for ImageFlowConfig"):
        config_from_dict(bad)
    with pytest.raises(ValueError, match="model 'glowish' is not registered"):
        config_from_dict({"model": "glowish", "config": {}})


def test_legacy_config_dicts_still_load():
    """resflow 0.1 stored {"kind": "vector" | "image", **fields}."""
    cfg = get_preset("toy2d")
    legacy = {"kind": "vector", **config_to_dict(cfg)["config"]}
    assert config_from_dict(legacy) == cfg


def test_every_family_resolves_by_data_kind():
    assert resolve_model("residual-flow", "vector").name == "residual-flow-vector"
    assert resolve_model("residual-flow", "image").name == "residual-flow"
    assert resolve_model("iresnet", "image").name == "iresnet"
    assert default_preset(MODELS.get("iresnet"), "digits").name == "iresnet-digits"
    assert default_preset(MODELS.get("residual-flow-vector"), "8gaussians").name == "toy2d"
    for family in ("realnvp", "glow"):
        assert resolve_model(family, "image").name == family
        assert resolve_model(family, "vector").name == f"{family}-vector"
        assert default_preset(MODELS.get(family), "digits").name == f"{family}-digits"
        assert default_preset(MODELS.get(family), "mnist").name == f"{family}-mnist"
        assert default_preset(MODELS.get(f"{family}-vector"), "grid").name == f"{family}-toy2d"
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        resolve_model("nope", "image")


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


def test_certify_every_reaches_every_lipschitz_layer():
    from resflow.layers.residual.spectral import CERTIFY_EVERY, LipschitzLayer

    for name, every in (("toy2d", 1), ("digits-small", 7), ("iresnet-digits", None)):
        changes = {} if every is None else {"certify_every": every}
        model = build_model(get_preset(name, **changes))
        layers = [m for m in model.modules() if isinstance(m, LipschitzLayer)]
        assert layers and all(m.certify_every == (every or CERTIFY_EVERY) for m in layers)
    with pytest.raises(ConfigError, match="certify_every"):
        get_preset("toy2d", certify_every=0)
