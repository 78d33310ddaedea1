"""The recipe of docs/DATA_FORMATS.md ("How to add a data format"), followed literally: a
tiny image format and a tiny vector format are defined here, registered, loaded through
:func:`resflow.data.load_data` and unregistered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from resflow.data import DataConfig, DataSplit, data_kind, load_data
from resflow.data.registry import (
    FORMATS,
    DataFormat,
    ImageRequest,
    Loaded,
    register_format,
    registered_format,
    unregister_format,
)

# Step 2: the loader. An image format reads one split: uint8 [N, C, H, W] in
# 0 .. levels-1, int64 labels [N] (or None), and the number of levels.


def read_checkers(request: ImageRequest) -> Loaded:
    """2x2 black-and-white checkerboards; label 1 where the top-left pixel is white."""
    n = 6 if request.split == "train" else 2
    i = torch.arange(n).view(n, 1, 1, 1)
    rows, cols = torch.arange(2).view(1, 1, 2, 1), torch.arange(2).view(1, 1, 1, 2)
    images = ((i + rows + cols) % 2).to(torch.uint8)
    return images, images[:, 0, 0, 0].long(), 2


# Step 3: the entry: its names, its kind and its loader.
CHECKERS = DataFormat(
    names=("checkers",),
    kind="image",
    read=read_checkers,
    description="2x2 checkerboards (2 levels, 6 train / 2 test)",
)


@pytest.fixture
def checkers() -> Iterator[DataFormat]:
    register_format(CHECKERS)
    yield CHECKERS
    unregister_format(CHECKERS)


def test_a_new_image_format_loads_through_load_data(checkers: DataFormat) -> None:
    assert data_kind("checkers") == "image"
    split = load_data("checkers", n_valid=2)
    assert split.shape == (1, 2, 2) and split.levels == 2
    assert split.train.dtype == torch.uint8 and len(split.train) == 4 and len(split.test) == 2
    assert split.valid is not None and len(split.valid) == 2
    assert split.test.tolist() == [[[[0, 1], [1, 0]]], [[[1, 0], [0, 1]]]]
    assert split.test_labels is not None and split.test_labels.tolist() == [0, 1]
    assert split.n_classes == 2
    resized = load_data("checkers", image_size=4)  # load_images resizes every format
    assert resized.shape == (1, 4, 4) and int(resized.train.max()) <= 1


def test_a_new_format_is_gone_after_unregistering() -> None:
    with registered_format(CHECKERS):
        assert "checkers" in FORMATS
        assert load_data("checkers").levels == 2
    assert "checkers" not in FORMATS
    with pytest.raises(ValueError, match=r"unknown data set 'checkers'.*'digits'"):
        load_data("checkers")


# A vector format loads the whole split from the DataConfig instead.


def load_line(cfg: DataConfig) -> DataSplit:
    """Points on the diagonal of the plane: ``n_train`` and ``n_test`` of them."""
    line = torch.linspace(0, 1, cfg.n_train + cfg.n_test).unsqueeze(1).repeat(1, 2)
    return DataSplit(line[: cfg.n_train], line[cfg.n_train :], cfg.name, config=cfg)


def test_a_new_vector_format_loads_through_load_data() -> None:
    line = DataFormat(names=("diagonal",), kind="vector", load=load_line, group="a line")
    with registered_format(line):
        assert data_kind("diagonal") == "vector"
        split = load_data("diagonal", n_train=3, n_test=2)
        assert split.shape == (2,) and split.levels is None and split.n_classes is None
        assert split.test[:, 0].tolist() == [0.75, 1.0]
        with pytest.raises(ValueError, match=r"a line \['diagonal'\]"):
            load_data("nope")
    assert "diagonal" not in FORMATS
