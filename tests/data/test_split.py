"""DataConfig and DataSplit: labels, a validation part, typed options."""

import pytest
import torch

from resflow.config import ConfigError
from resflow.data import DataConfig, data_kind, load_data


def test_image_split_carries_labels_and_a_disjoint_validation_part():
    full = load_data(DataConfig(name="digits"))
    assert full.train_labels is not None and full.test_labels is not None
    assert len(full.train_labels) == len(full.train) == 1500 and full.n_classes == 10
    split = load_data(DataConfig(name="digits", n_valid=100))
    assert len(split.valid) == 100 and len(split.train) == 1400
    assert split.valid_labels is not None and len(split.valid_labels) == 100
    # the parts partition the original training set, labels travelling with images
    pairs = {(tuple(x.flatten().tolist()), int(y)) for x, y in zip(full.train, full.train_labels)}
    images = torch.cat([split.train, split.valid])
    labels = torch.cat([split.train_labels, split.valid_labels])
    for x, y in zip(images, labels):
        assert (tuple(x.flatten().tolist()), int(y)) in pairs
    assert split.config == DataConfig(name="digits", n_valid=100)


def test_toy_split_has_fresh_validation_samples():
    split = load_data("8gaussians", n_train=100, n_test=50, n_valid=30, seed=3)
    assert split.valid.shape == (30, 2) and not torch.equal(split.valid, split.test[:30])
    again = load_data(DataConfig(name="8gaussians", n_train=100, n_test=50, n_valid=30, seed=3))
    assert torch.equal(split.train, again.train) and torch.equal(split.valid, again.valid)


def test_typed_options_and_kinds():
    with pytest.raises(ConfigError, match="n_bits: must be <= 8, got 9"):
        DataConfig(n_bits=9)
    with pytest.raises(ConfigError, match="n_valid: must be >= 0"):
        DataConfig(n_valid=-1)
    with pytest.raises(ValueError, match="leaves no training data"):
        load_data(DataConfig(name="digits", n_valid=1500))
    assert data_kind("digits") == "image" and data_kind("8gaussians") == "vector"
    assert data_kind("x.csv") == "vector"
