"""Typed configuration: coercion, ranges, nested overrides, flags from dataclasses."""

import argparse
import math

import pytest

from resflow.config import (
    ConfigError,
    add_flags,
    from_dict,
    given_flags,
    override,
    parse_sets,
    to_dict,
)
from resflow.models import get_preset
from resflow.models.residual_flow import ImageFlowConfig
from resflow.train_config import TrainConfig


def test_override_at_any_depth_with_checked_types():
    cfg = get_preset("mnist")
    new = override(cfg, parse_sets(["n_blocks=[2,2]", "estimator.dist=geometric", "coeff=0.9"]))
    assert new.n_blocks == (2, 2) and new.estimator.dist == "geometric" and new.coeff == 0.9
    assert cfg.n_blocks == (16, 16, 16)  # the preset itself is untouched
    assert override(cfg, {"norm_orders": None}).norm_orders is None
    assert override(cfg, {"coeff": "9e-1"}).coeff == 0.9  # numbers in text
    with pytest.raises(ConfigError, match=r"estimator.geom_p: must be < 1, got 1"):
        override(cfg, {"estimator.geom_p": 1})
    with pytest.raises(ConfigError, match="coeff has no sub-options"):
        override(cfg, {"coeff.x": 1})
    with pytest.raises(ConfigError, match="image_shape: expected a list of 3 values"):
        override(cfg, {"image_shape": [1, 28]})
    with pytest.raises(ConfigError, match=r"hidden: expected an integer, got 2.5"):
        override(cfg, {"hidden": 2.5})
    with pytest.raises(ConfigError, match="coeff: must be a number, got nan"):
        override(cfg, {"coeff": math.nan})


def test_construction_validates_and_coerces():
    assert ImageFlowConfig(n_blocks=[4, 4]).n_blocks == (4, 4)
    with pytest.raises(ConfigError, match="coeff: must be < 1, got 1"):
        ImageFlowConfig(coeff=1.0)
    with pytest.raises(ConfigError, match="activation: expected one of 'lipswish'"):
        ImageFlowConfig(activation="relu")


def test_plain_data_round_trip():
    cfg = get_preset("celebahq256")
    assert from_dict(ImageFlowConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown option estimator.nope"):
        from_dict(ImageFlowConfig, to_dict(cfg) | {"estimator": {"nope": 1}})


def test_flags_come_from_the_dataclass():
    p = argparse.ArgumentParser()
    add_flags(p, TrainConfig)
    args = p.parse_args(["--lr", "3e-4", "--no-tensorboard", "--eval-max", "null"])
    assert given_flags(args, TrainConfig) == {"lr": 3e-4, "tensorboard": False, "eval_max": None}
    assert given_flags(p.parse_args([]), TrainConfig) == {}  # absent flags stay absent
    assert "(default: 0.001)" in p.format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(ConfigError, match="--warmup: expected an integer, got 'soon'"):
        given_flags(p.parse_args(["--warmup", "soon"]), TrainConfig)
