"""The data set registry: every data set and file format is a :class:`DataFormat` here.

A format names the data sets it loads, their kind and its loader:

* an ``"image"`` format *reads one split* into quantized pixels,
  ``read(request) -> (images uint8 [N, C, H, W], labels int64 [N] or None, levels)``;
  :func:`resflow.data.images.load_images` checks the arguments before and resizes and
  reduces bits after it, and :func:`resflow.data.load_data` reads ``train`` and ``test``
  and holds out ``n_valid`` training images;
* a ``"vector"`` format *loads the whole split*, ``load(config) -> DataSplit``.

A name ``*.ext`` stands for every file name ending in ``.ext`` (any case): the tabular
matrix files are loaded by their path. Each module of :mod:`resflow.data.formats`
registers its formats when imported; ``docs/DATA_FORMATS.md`` shows how to add one.

>>> find_format("digits").kind, find_format("8gaussians").kind
('image', 'vector')
>>> find_format("runs/table.CSV").names
('*.npy', '*.csv', '*.txt')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor

from resflow.data.config import DataConfig
from resflow.data.split import DataSplit
from resflow.registry import Registry

__all__ = [
    "FORMATS",
    "DataFormat",
    "DataKind",
    "ImageRequest",
    "Loaded",
    "find_format",
    "image_names",
    "register_format",
    "registered_format",
    "unregister_format",
]

DataKind = Literal["image", "vector"]

#: What an image format's ``read`` returns: ``(images, labels, levels)``, with ``images``
#: ``uint8 [N, C, H, W]`` in ``0 .. levels-1`` and ``labels`` ``int64 [N]`` or ``None``.
Loaded = tuple[Tensor, Tensor | None, int]


@dataclass(frozen=True)
class ImageRequest:
    """One split of an image data set, as :func:`~resflow.data.images.load_images` asks
    an image format's ``read`` for it (the arguments are already checked).

    Attributes:
        name: the registered name (one format may serve several names).
        split: ``"train"`` or ``"test"``.
        root: ``data_dir``, else ``$RESFLOW_DATA_DIR``; ``None`` when neither is set.
        path: the user's file or folder (only for formats with ``takes_path``).
        download: fetch missing files (formats with a public download).
        verify: check the files' checksums even without ``download``.
        progress: show download progress bars.
        image_size: the square size asked for; a format with ``resizes`` applies it
            while reading, the others are resized after ``read``.
        n_bits: the bits asked for (applied after ``read``; a format may refuse them).
    """

    name: str
    split: str
    root: Path | None
    path: str | Path | None = None
    download: bool = False
    verify: bool = False
    progress: bool = True
    image_size: int | None = None
    n_bits: int | None = None


@dataclass(frozen=True)
class DataFormat:
    """One registered data set or file format (see the module docstring).

    Attributes:
        names: the names it is loaded by (``*.ext``: any file name ending in ``.ext``).
        kind: ``"image"`` (integer levels ``[C, H, W]``) or ``"vector"`` (real ``[D]``).
        read: image formats: one split, ``ImageRequest -> (images, labels, levels)``.
        load: vector formats: ``DataConfig -> DataSplit``.
        group: how the error for an unknown name introduces these names
            (default ``"an image data set"`` / ``"a vector data set"``).
        takes_path: image formats: reads ``path=`` (a user's file or folder).
        resizes: image formats: applies ``image_size`` itself while reading.
        default_bits: image formats: the bits used when ``n_bits`` is ``None``.
        description: one line for listings.
    """

    names: tuple[str, ...]
    kind: DataKind
    read: Callable[[ImageRequest], Loaded] | None = None
    load: Callable[[DataConfig], DataSplit] | None = None
    group: str = ""
    takes_path: bool = False
    resizes: bool = False
    default_bits: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.names or isinstance(self.names, str):
            raise ValueError(f"a data format needs a tuple of names, got {self.names!r}")
        if self.kind not in ("image", "vector"):
            raise ValueError(f"kind must be 'image' or 'vector', got {self.kind!r}")
        if self.kind == "image" and (self.read is None or self.load is not None):
            raise ValueError(f"image format {self.names[0]!r} needs read= (and no load=)")
        if self.kind == "vector" and (self.load is None or self.read is not None):
            raise ValueError(f"vector format {self.names[0]!r} needs load= (and no read=)")
        if not self.group:
            group = "an image data set" if self.kind == "image" else "a vector data set"
            object.__setattr__(self, "group", group)


#: Every registered name (or ``*.ext`` pattern) -> its format, in registration order.
FORMATS: Registry[DataFormat] = Registry("data set")


def register_format(fmt: DataFormat) -> DataFormat:
    """Register ``fmt`` under each of its names (none may be taken already)."""
    taken = [n for n in fmt.names if n in FORMATS]
    if taken:
        raise ValueError(f"data set name(s) {taken} are already registered")
    for name in fmt.names:
        FORMATS.register(name, fmt)
    return fmt


def unregister_format(fmt: DataFormat) -> None:
    """Remove ``fmt``'s names from the registry."""
    for name in fmt.names:
        if name in FORMATS and FORMATS.get(name) is fmt:
            FORMATS.unregister(name)


@contextmanager
def registered_format(fmt: DataFormat) -> Iterator[DataFormat]:
    """Register ``fmt`` for the ``with`` block only (tests, experiments)."""
    register_format(fmt)
    try:
        yield fmt
    finally:
        unregister_format(fmt)


def find_format(name: str) -> DataFormat:
    """The format of a data set name or matrix file path; a clear error listing the
    known names otherwise."""
    if name in FORMATS:
        return FORMATS.get(name)
    pattern = "*" + Path(name).suffix.lower()
    if pattern != "*" and pattern in FORMATS:
        return FORMATS.get(pattern)
    groups: dict[str, list[str]] = {}
    for known, fmt in FORMATS.items():
        groups.setdefault(fmt.group, []).append(known)
    parts = [f"{group} {names}" for group, names in groups.items()]
    listed = ", ".join(parts[:-1]) + ", or " + parts[-1] if len(parts) > 1 else "".join(parts)
    raise ValueError(f"unknown data set {name!r}: use {listed}")


def image_names() -> tuple[str, ...]:
    """The names of the registered image data sets, in registration order."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.kind == "image")
