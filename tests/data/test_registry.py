"""Tests for the registries: resflow.registry.Registry's unregister / registered and the
data set registry resflow.data.registry (names, patterns, errors)."""

from __future__ import annotations

import pytest
import torch

from resflow.data.images import DATASETS, load_images
from resflow.data.registry import (
    FORMATS,
    DataFormat,
    ImageRequest,
    Loaded,
    find_format,
    image_names,
    register_format,
    registered_format,
    unregister_format,
)
from resflow.registry import Registry


def _read_one(request: ImageRequest) -> Loaded:
    return torch.zeros(1, 1, 2, 2, dtype=torch.uint8), None, 2


def test_registry_unregister_and_registered() -> None:
    colors: Registry[int] = Registry("color")
    colors.register("red", 1)
    assert colors.unregister("red") == 1 and "red" not in colors
    with pytest.raises(ValueError, match="unknown color 'red'"):
        colors.unregister("red")
    with pytest.raises(RuntimeError), colors.registered("blue", 2):
        assert colors.get("blue") == 2
        raise RuntimeError("the entry is removed even when the block fails")
    assert "blue" not in colors and len(colors) == 0
    colors.register("green", 3)
    with pytest.raises(ValueError, match="already registered"), colors.registered("green", 4):
        pass
    assert colors.get("green") == 3  # a failed registration removes nothing


def test_builtin_names_in_order() -> None:
    assert DATASETS == image_names()
    assert DATASETS == (
        "digits", "mnist", "fashion-mnist", "cifar10", "imagenet32", "imagenet64", "celebahq",
        "folder", "npy",
    )  # fmt: skip
    assert find_format("mnist") is find_format("fashion-mnist")
    assert find_format("checkerboard").kind == "vector"
    assert find_format("power").kind == "vector"


def test_file_patterns() -> None:
    matrix = find_format("some/dir/table.CSV")
    assert matrix is find_format("x.npy") is find_format("x.txt")
    assert matrix.names == ("*.npy", "*.csv", "*.txt") and matrix.kind == "vector"
    assert find_format("npy").kind == "image"  # the image format, not the file pattern
    with pytest.raises(ValueError, match="unknown data set 'x.parquet'"):
        find_format("x.parquet")


def test_unknown_name_lists_every_group() -> None:
    with pytest.raises(ValueError) as err:
        find_format("nope")
    msg = str(err.value)
    assert msg.startswith("unknown data set 'nope': use a toy density ['8gaussians'")
    for part in ("an image data set ['digits'", "a tabular benchmark ['power'", "'*.csv'"):
        assert part in msg
    with pytest.raises(ValueError, match="unknown dataset 'moons'; choose one of digits"):
        load_images("moons")  # a vector data set is not an image data set


def test_register_format_is_all_or_nothing() -> None:
    clash = DataFormat(names=("fresh-name", "digits"), kind="image", read=_read_one)
    with pytest.raises(ValueError, match=r"\['digits'\] are already registered"):
        register_format(clash)
    assert "fresh-name" not in FORMATS
    one = DataFormat(names=("one", "uno"), kind="image", read=_read_one)
    with registered_format(one):
        assert image_names()[-2:] == ("one", "uno")
        assert load_images("uno").name == "uno"
        unregister_format(DataFormat(names=("one",), kind="image", read=_read_one))
        assert "one" in FORMATS  # only the registered object is removed
    assert "one" not in FORMATS and "uno" not in FORMATS


def test_data_format_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="tuple of names"):
        DataFormat(names="digits", kind="image", read=_read_one)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs read="):
        DataFormat(names=("a",), kind="image")
    with pytest.raises(ValueError, match="needs load="):
        DataFormat(names=("a",), kind="vector", read=_read_one)
    with pytest.raises(ValueError, match="kind must be"):
        DataFormat(names=("a",), kind="audio", read=_read_one)  # type: ignore[arg-type]
    assert DataFormat(names=("a",), kind="image", read=_read_one).group == "an image data set"


def test_takes_path_message_comes_from_the_registry() -> None:
    with pytest.raises(ValueError, match="only used by the 'folder' and 'npy' datasets"):
        load_images("digits", path="x")
