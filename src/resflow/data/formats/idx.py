"""The IDX format (LeCun et al. 1998) of ``mnist`` and ``fashion-mnist`` (Xiao et al. 2017,
arXiv:1708.07747): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or not;
60,000 / 10,000 images of 28x28 with labels. Fashion-MNIST is also found in
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).

>>> _idx_files("test")
('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from resflow.data.download import DOWNLOADS, download_remote, file_md5, matches_remote
from resflow.data.formats.common import fmt_dirs, labels_tensor, require_root, search_dirs
from resflow.data.registry import DataFormat, ImageRequest, Loaded, register_format

__all__ = ["FASHION_MNIST_SYSTEM_DIR", "read_idx", "read_idx_dataset"]

#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it if it starts with the gzip magic ``1f 8b``."""
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    if not is_gzip:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({err})") from err


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array.

    IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``00 00 TT DD``
    where ``TT`` is the element type (``0x08`` = uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64) and ``DD`` the number of dimensions,
    followed by ``DD`` big-endian uint32 sizes and the data in C order (big-endian).

    Args:
        path: File path; gzip compression is detected from the content, not the name.
        ndim: If given, the required number of dimensions.

    Raises:
        ValueError: bad magic number, unexpected type/ndim, or a data size that does not
            match the header (truncated or padded file); the message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000TTDD, e.g. 00000803 for images, 00000801 for labels)"
        )
    dtype, file_ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim is not None and file_ndim != ndim:
        raise ValueError(f"{path}: IDX file has {file_ndim} dimension(s), expected {ndim}")
    header = 4 + 4 * file_ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=file_ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing data"
        raise ValueError(
            f"{path}: IDX file {kind}: the header declares shape {dims} ({expected} data "
            f"bytes) but the file holds {actual} data bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writable


def _idx_files(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx(directory: Path, base: str) -> Path | None:
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_dataset(request: ImageRequest) -> Loaded:
    """MNIST / Fashion-MNIST from IDX files.

    Search order: ``data_dir``, ``data_dir/<name>``, ``data_dir/<name>/raw``, the torchvision
    layout ``data_dir/MNIST/raw`` (``FashionMNIST/raw``), and, for Fashion-MNIST only,
    :data:`FASHION_MNIST_SYSTEM_DIR` last (so it is used when ``data_dir`` is ``None`` or
    lacks the files). Both files of a split must be in the same folder; ``X`` and ``X.gz``
    are both accepted.
    """
    name, split, root = request.name, request.split, request.root
    download, verify, progress = request.download, request.verify, request.progress
    tv_name = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = search_dirs(root, name, extra=[f"{tv_name}/raw"])
    if name == "fashion-mnist":
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    bases = _idx_files(split)
    remotes = {r.filename.removesuffix(".gz"): r for r in DOWNLOADS[name]}

    found: list[Path] | None = None
    for d in dirs:
        paths = [_find_idx(d, b) for b in bases]
        if all(p is not None for p in paths):
            if download and not all(matches_remote(p, remotes[b]) for p, b in zip(paths, bases)):
                continue  # a corrupt copy: look further, else download a fresh one
            found = paths  # type: ignore[assignment]
            break
    if found is None and download:
        dest = require_root(root, name) / name
        found = [download_remote(remotes[b], dest, progress=progress) for b in bases]
    if found is None:
        present = {b for b in bases for d in dirs if _find_idx(d, b) is not None}
        missing = [f"{b}[.gz]" for b in bases if b not in present]
        url = DOWNLOADS[name][0].url.rsplit("/", 1)[0] + "/"
        where = f"{root / name}" if root is not None else "<data_dir>/" + name
        detail = (
            f"missing file(s) {', '.join(missing)}"
            if missing
            else f"{bases[0]} and {bases[1]} are not together in one folder"
        )
        hint = (
            " or install the Debian package dataset-fashion-mnist (files go to "
            f"{FASHION_MNIST_SYSTEM_DIR})"
            if name == "fashion-mnist"
            else ""
        )
        raise FileNotFoundError(
            f"{name} ({split}): {detail}. Looked in: {fmt_dirs(dirs)}. Get them with "
            f"load_images({name!r}, data_dir=..., download=True), or download them from {url} "
            f"into {where}{hint}."
        )

    image_path, label_path = found
    if verify:
        for p, b in zip(found, bases):
            r = remotes[b]
            if not matches_remote(p, r):
                raise ValueError(
                    f"{p} is not the official {name} file {r.filename}: md5 {file_md5(p)} "
                    f"matches neither {r.md5} (.gz) nor {r.uncompressed_md5} (uncompressed "
                    "content). Delete it and re-download (download=True)."
                )
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected uint8 IDX files, got {images.dtype} in {image_path} and "
            f"{labels.dtype} in {label_path}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name} ({split}): {image_path} holds {images.shape[0]} images but {label_path} "
            f"holds {labels.shape[0]} labels"
        )
    return torch.from_numpy(images[:, None]), labels_tensor(labels), 256


IDX = register_format(
    DataFormat(
        names=("mnist", "fashion-mnist"),
        kind="image",
        read=read_idx_dataset,
        description="MNIST / Fashion-MNIST IDX files (28x28, 60,000 train / 10,000 test)",
    )
)
