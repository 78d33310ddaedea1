"""Image datasets as quantized ``uint8`` tensors.

:func:`load_images` reads an image dataset from its *original distribution format* into memory
and returns an :class:`ImageData`: a ``uint8`` tensor ``[N, C, H, W]`` of integer pixel values
in ``0 .. levels-1`` plus optional ``int64`` labels. Nothing is dequantized or normalized here;
a flow model typically maps ``x`` to ``(x + u) / levels`` with ``u ~ U[0, 1)`` (uniform
dequantization, Theis et al. 2016, "A note on the evaluation of generative models") and reports
bits per dimension relative to ``levels`` bins per sub-pixel.

Supported datasets (``DATASETS``) and their formats:

- ``digits``: scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``, 1,797
  images, values 0..16, so ``levels = 17``). Train = the first 1,500 images, test = the last
  297 (a fixed, RNG-free split).
- ``mnist``: IDX files (LeCun et al. 1998) ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
  gzipped or not; 60,000 / 10,000 images of 28x28.
- ``fashion-mnist``: same format (Xiao et al. 2017, arXiv:1708.07747). The files are also
  found in ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``cifar10``: the "python version" pickled batches ``cifar-10-batches-py/data_batch_1..5``
  and ``test_batch`` (Krizhevsky 2009), or the ``cifar-10-python.tar.gz`` archive, which is
  extracted next to itself on first use.
- ``imagenet32`` / ``imagenet64``: downsampled ImageNet npz batches (Chrabaszcz, Loshchilov &
  Hutter 2017, arXiv:1707.08819) ``train_data_batch_1..10.npz`` and ``val_data.npz`` with keys
  ``data`` (``uint8 [N, 3*S*S]``, channel-planar) and ``labels`` (1-based). They need a login
  at image-net.org and are never downloaded automatically.
- ``celebahq``: a folder of PNG/JPEG files (CelebA-HQ, Karras et al. 2018) split into
  ``train/`` and ``test/``; reduced to 5 bits by default, as in Glow (Kingma & Dhariwal 2018)
  and Residual Flows (Chen et al. 2019).
- ``folder``: any folder of images (``path=``), optionally with ``train/`` and ``test/``.
- ``npy``: a ``uint8`` ``.npy`` array (``path=``) of shape ``[N, H, W]``, ``[N, H, W, C]`` or
  ``[N, C, H, W]`` with ``C`` in {1, 3}.

Where files are looked for
--------------------------
``data_dir`` (or, if it is ``None``, the environment variable ``RESFLOW_DATA_DIR``) is the
root. For a dataset ``<name>`` the loaders look in ``data_dir``, ``data_dir/<name>`` and
``data_dir/<name>/raw`` (plus dataset-specific folders documented on each loader), so both a
folder holding only that dataset's files and a shared data root work. Downloads go to
``data_dir/<name>``. Nothing is written outside ``data_dir`` (the CIFAR-10 archive is
extracted into the folder that holds it).

Bit reduction
-------------
With ``n_bits < 8`` every 8-bit value ``x`` becomes ``x >> (8 - n_bits)``, i.e.
``floor(x / 2**(8 - n_bits))``, and ``levels = 2**n_bits`` (as in Kingma & Dhariwal 2018).
It is applied after any resizing.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from resflow.data.download import (
    CIFAR10_BATCH_MD5,
    DOWNLOADS,
    RemoteFile,
    download_remote,
    file_md5,
    matches_remote,
)
from resflow.preprocess.bits import reduce_bits

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ImageData",
    "load_images",
    "read_idx",
]

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "imagenet32",
    "imagenet64",
    "celebahq",
    "folder",
    "npy",
)
SPLITS: tuple[str, ...] = ("train", "test")

#: Environment variable used as ``data_dir`` when the argument is ``None``.
DATA_DIR_ENV = "RESFLOW_DATA_DIR"
#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: File extensions (lower case) read by the ``celebahq`` and ``folder`` loaders.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

_DIGITS_N_TEST = 297
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_IMAGENET_URL = "https://image-net.org/download-images"
_CELEBAHQ_URL = "https://github.com/tkarras/progressive_growing_of_gans"
_GRAY_MODES = frozenset({"1", "L", "LA"})


@dataclass(eq=False, repr=False)
class ImageData:
    """An in-memory image dataset of quantized pixel values.

    Attributes:
        images: ``uint8`` tensor ``[N, C, H, W]`` with values in ``0 .. levels-1``.
        labels: ``int64`` tensor ``[N]`` of class labels, or ``None`` if the source has none.
        levels: Number of quantization levels per sub-pixel (256 for 8-bit data, 17 for
            scikit-learn digits, ``2**n_bits`` after bit reduction).
        name: Dataset name (one of :data:`DATASETS`).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    levels: int
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                "ImageData.images must be a uint8 tensor [N, C, H, W], got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels is not None and (
            self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],)
        ):
            raise ValueError(
                f"ImageData.labels must be an int64 tensor [{self.images.shape[0]}], got "
                f"{self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        if not 2 <= self.levels <= 256:
            raise ValueError(f"ImageData.levels must be in 2..256, got {self.levels}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return (c, h, w)

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, n={len(self)}, shape={self.shape}, "
            f"levels={self.levels}, labels={'yes' if self.labels is not None else 'no'})"
        )


# =============================================================================================
# Public entry point
# =============================================================================================


def load_images(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    n_bits: int | None = None,
    image_size: int | None = None,
    path: str | Path | None = None,
    verify: bool = False,
    progress: bool = True,
) -> ImageData:
    """Load an image dataset split into memory as quantized ``uint8`` tensors.

    Args:
        name: One of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        data_dir: Root folder of the data files (see the module docstring for the search
            order). ``None`` falls back to the environment variable ``RESFLOW_DATA_DIR``.
        download: Download missing (or checksum-failing) files into ``data_dir/<name>`` for
            ``mnist``, ``fashion-mnist`` and ``cifar10``; files are verified by md5. For
            datasets without a public download a missing file raises an explanatory
            :class:`FileNotFoundError`.
        n_bits: Bits per sub-pixel, 1..8. ``None`` means the dataset default: 5 for
            ``celebahq``, 8 otherwise. Values ``< 8`` apply ``x >> (8 - n_bits)`` and set
            ``levels = 2**n_bits``. ``digits`` (17 levels) only accepts ``None`` or 8.
        image_size: Resize every image to ``image_size x image_size``. ``celebahq``/``folder``
            images are center-cropped to a square and resized with Pillow's Lanczos filter
            while reading; other datasets are resized as tensors with antialiased bilinear
            interpolation (:func:`torch.nn.functional.interpolate`) and rounded.
        path: File or folder for the ``folder`` and ``npy`` datasets (``data_dir`` is used if
            ``path`` is ``None``). Not accepted for the other datasets.
        verify: Check the md5 of the files of ``mnist``, ``fashion-mnist`` and ``cifar10``
            against the official values even without ``download`` (``download=True``
            always verifies).
        progress: Show download progress bars.

    Returns:
        An :class:`ImageData` with ``images`` ``uint8 [N, C, H, W]``.

    Raises:
        ValueError: unknown name/split, bad arguments, or a corrupt/malformed file (the message
            names the file).
        FileNotFoundError: required files are missing; the message lists them, the folders
            searched and how to obtain the files.
        RuntimeError: a download failed.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n_bits is not None and (isinstance(n_bits, bool) or n_bits not in range(1, 9)):
        raise ValueError(f"n_bits must be an integer in 1..8 (or None), got {n_bits!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer (or None), got {image_size!r}")
    if path is not None and name not in ("folder", "npy"):
        raise ValueError(
            f"path= is only used by the 'folder' and 'npy' datasets; use data_dir= for {name!r}"
        )
    root = _resolve_root(data_dir)

    if name == "digits":
        if n_bits not in (None, 8):
            raise ValueError(
                "the 'digits' dataset has 17 levels (values 0..16) and cannot be reduced to "
                f"n_bits={n_bits}; use n_bits=None"
            )
        images, labels, levels = _load_digits(split)
    elif name in ("mnist", "fashion-mnist"):
        images, labels, levels = _load_idx_dataset(name, split, root, download, verify, progress)
    elif name == "cifar10":
        images, labels, levels = _load_cifar10(split, root, download, verify, progress)
    elif name in ("imagenet32", "imagenet64"):
        images, labels, levels = _load_imagenet(name, split, root, download)
    elif name == "celebahq":
        images, labels, levels = _load_celebahq(split, root, download, image_size)
        if n_bits is None:
            n_bits = 5
    elif name == "folder":
        images, labels, levels = _load_folder(split, _user_path(name, path, root), image_size)
    else:  # npy
        images, labels, levels = _load_npy(split, _user_path(name, path, root))

    if image_size is not None and name not in ("celebahq", "folder"):
        images = _resize_tensor(images, image_size, levels)
    if n_bits is not None and n_bits < 8:
        images = reduce_bits(images, n_bits)
        levels = 2**n_bits
    return ImageData(images=images, labels=labels, levels=levels, name=name)


# =============================================================================================
# Shared helpers
# =============================================================================================

_Loaded = tuple[torch.Tensor, torch.Tensor | None, int]  # (images, labels, levels)


def _resolve_root(data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        return Path(env).expanduser() if env else None
    return Path(data_dir).expanduser()


def _user_path(name: str, path: str | Path | None, root: Path | None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    if root is not None:
        return root
    raise ValueError(f"the {name!r} dataset needs path= (or data_dir=) pointing at your data")


def _search_dirs(root: Path | None, name: str, extra: Sequence[str] = ()) -> list[Path]:
    """``root``, ``root/name``, ``root/name/raw`` and ``root/<e>`` for ``e`` in ``extra``."""
    if root is None:
        return []
    return [root, root / name, root / name / "raw", *(root / e for e in extra)]


def _fmt_dirs(dirs: Iterable[Path]) -> str:
    dirs = list(dirs)
    if not dirs:
        return f"(nowhere: no data_dir was given and ${DATA_DIR_ENV} is not set)"
    return ", ".join(str(d) for d in dirs)


def _require_root(root: Path | None, name: str) -> Path:
    if root is None:
        raise ValueError(
            f"download=True for {name!r} needs a destination: pass data_dir= or set ${DATA_DIR_ENV}"
        )
    return root


def _resize_tensor(images: torch.Tensor, size: int, levels: int) -> torch.Tensor:
    """Resize ``uint8 [N, C, H, W]`` to ``size x size`` (antialiased bilinear, rounded)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], 1024):
        chunk = images[start : start + 1024].float()
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + 1024] = resized.round_().clamp_(0, levels - 1).to(torch.uint8)
    return out


def _labels_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))


# =============================================================================================
# digits
# =============================================================================================


def _load_digits(split: str) -> _Loaded:
    """scikit-learn digits: train = images[:1500], test = images[1500:] (297 images)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images).round().astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = np.asarray(bunch.target)
    cut = images.shape[0] - _DIGITS_N_TEST
    sl = slice(None, cut) if split == "train" else slice(cut, None)
    return torch.from_numpy(images[sl].copy()), _labels_tensor(labels[sl]), 17


# =============================================================================================
# IDX (MNIST, Fashion-MNIST)
# =============================================================================================

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


def _load_idx_dataset(
    name: str, split: str, root: Path | None, download: bool, verify: bool, progress: bool
) -> _Loaded:
    """MNIST / Fashion-MNIST from IDX files.

    Search order: ``data_dir``, ``data_dir/<name>``, ``data_dir/<name>/raw``, the torchvision
    layout ``data_dir/MNIST/raw`` (``FashionMNIST/raw``), and, for Fashion-MNIST only,
    :data:`FASHION_MNIST_SYSTEM_DIR` last (so it is used when ``data_dir`` is ``None`` or
    lacks the files). Both files of a split must be in the same folder; ``X`` and ``X.gz``
    are both accepted.
    """
    tv_name = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = _search_dirs(root, name, extra=[f"{tv_name}/raw"])
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
        dest = _require_root(root, name) / name
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
            f"{name} ({split}): {detail}. Looked in: {_fmt_dirs(dirs)}. Get them with "
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
    return torch.from_numpy(images[:, None]), _labels_tensor(labels), 256


# =============================================================================================
# CIFAR-10
# =============================================================================================


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals a CIFAR batch needs.

    Loading a pickle can run arbitrary code; the CIFAR batches only reference numpy's array
    reconstruction functions, so everything else is refused.
    """

    _ALLOWED = frozenset(
        {
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module.removeprefix("numpy.core")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: ``{b'data': uint8 [N, 3072], b'labels': [N]}``.

    Each row of ``data`` is channel-planar: 1024 red, then 1024 green, then 1024 blue values,
    each a 32x32 image in row-major order, so ``data.reshape(N, 3, 32, 32)`` is NCHW.
    """
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as err:  # corrupt pickles raise many different exception types
        raise ValueError(
            f"{path} is not a valid CIFAR-10 python batch (unpickling failed: {err}). Delete "
            f"the {_CIFAR_DIR} folder and extract it again from {_CIFAR_ARCHIVE}."
        ) from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch lacks b'data' or b'labels' (keys: {list(batch)})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: b'labels' must be {data.shape[0]} integers, got {labels.dtype} "
            f"{list(labels.shape)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _extract_cifar(archive: Path) -> Path:
    """Safely extract ``cifar-10-batches-py/`` from ``archive`` into the archive's folder.

    Only regular files below ``cifar-10-batches-py/`` are extracted (no links, no absolute
    paths, no ``..``). Files are written to a temporary folder first and then moved into place,
    so an interrupted extraction leaves no partial batch behind.
    """
    dest = archive.parent / _CIFAR_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=archive.parent))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if not member.isfile() or not parts or parts[0] != _CIFAR_DIR:
                        continue
                    if PurePosixPath(member.name).is_absolute() or ".." in parts:
                        raise ValueError(f"unsafe path {member.name!r} in archive")
                    target = tmp.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None  # regular file
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        except (tarfile.TarError, EOFError, zlib.error, ValueError) as err:
            raise ValueError(
                f"{archive} is not a valid CIFAR-10 archive ({err}). Delete it and download it "
                f"again (download=True or {DOWNLOADS['cifar10'][0].url})."
            ) from err
        extracted = tmp / _CIFAR_DIR
        if not extracted.is_dir():
            raise ValueError(f"{archive} contains no {_CIFAR_DIR}/ folder")
        dest.mkdir(exist_ok=True)
        for f in extracted.iterdir():
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_cifar10(
    split: str, root: Path | None, download: bool, verify: bool, progress: bool
) -> _Loaded:
    """CIFAR-10 python batches.

    Search order: for each of ``data_dir``, ``data_dir/cifar10``, ``data_dir/cifar10/raw``
    the folder ``<dir>/cifar-10-batches-py`` and then ``<dir>`` itself; failing that, the
    first ``<dir>/cifar-10-python.tar.gz`` is extracted into ``<dir>``; failing that, with
    ``download=True``, the archive is downloaded into ``data_dir/cifar10`` and extracted.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    dirs = _search_dirs(root, "cifar10")
    batch_dirs = [b for d in dirs for b in (d / _CIFAR_DIR, d)]
    remote: RemoteFile = DOWNLOADS["cifar10"][0]

    def complete(d: Path) -> bool:
        return all((d / n).is_file() for n in names)

    folder = next((b for b in batch_dirs if complete(b)), None)
    if folder is None:
        archive = next((d / _CIFAR_ARCHIVE for d in dirs if (d / _CIFAR_ARCHIVE).is_file()), None)
        if archive is None and download:
            archive = download_remote(remote, _require_root(root, "cifar10") / "cifar10", progress)
        elif archive is not None and (download or verify) and not matches_remote(archive, remote):
            raise ValueError(
                f"{archive}: md5 {file_md5(archive)} does not match the official "
                f"{remote.md5}; delete it and download again"
            )
        if archive is not None:
            folder = _extract_cifar(archive)
            if not complete(folder):
                missing = [n for n in names if not (folder / n).is_file()]
                raise ValueError(f"{archive} lacks the batch file(s) {', '.join(missing)}")
    if folder is None:
        where = root / "cifar10" if root is not None else Path("<data_dir>/cifar10")
        raise FileNotFoundError(
            f"cifar10 ({split}): missing file(s) {', '.join(f'{_CIFAR_DIR}/{n}' for n in names)}"
            f" (and no {_CIFAR_ARCHIVE}). Looked in: {_fmt_dirs(batch_dirs)}. Get them with "
            "load_images('cifar10', data_dir=..., download=True), or download "
            f"{remote.url} (md5 {remote.md5}) into {where}; it is extracted automatically."
        )
    if download or verify:
        for n in names:
            actual = file_md5(folder / n)
            if actual != CIFAR10_BATCH_MD5[n]:
                raise ValueError(
                    f"{folder / n}: md5 {actual} does not match the official "
                    f"{CIFAR10_BATCH_MD5[n]}; delete {folder} and extract/download again"
                )

    batches = [_read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return torch.from_numpy(images), _labels_tensor(labels), 256


# =============================================================================================
# Downsampled ImageNet
# =============================================================================================


def _imagenet_help(size: int, root: Path | None) -> str:
    where = root / f"imagenet{size}" if root is not None else Path(f"<data_dir>/imagenet{size}")
    train_zips = (
        f"Imagenet{size}_train_npz.zip"
        if size == 32
        else "Imagenet64_train_part1_npz.zip and Imagenet64_train_part2_npz.zip"
    )
    return (
        f"ImageNet{size}x{size} cannot be downloaded automatically (the official site needs a "
        f"free account). Log in at {_IMAGENET_URL}, open 'Download downsampled image data' "
        f"(Chrabaszcz et al. 2017) and download {train_zips} and Imagenet{size}_val_npz.zip; "
        f"unzip them into {where} (giving e.g. {where}/Imagenet{size}_train_npz/"
        f"train_data_batch_1.npz and {where}/Imagenet{size}_val_npz/val_data.npz)."
    )


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a .npy array, not an .npz archive")
    missing = [k for k in ("data", "labels") if k not in npz.files]
    if missing:
        npz.close()
        raise ValueError(
            f"{path} lacks the key(s) {missing} (has {npz.files}); a downsampled-ImageNet "
            "batch must hold 'data' (uint8 [N, 3*S*S]) and 'labels' (1-based class indices)"
        )
    return npz


def _npz_array(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except Exception as err:
        raise ValueError(f"{path}: cannot read array {key!r} ({err})") from err


def _load_imagenet(name: str, split: str, root: Path | None, download: bool) -> _Loaded:
    """Downsampled ImageNet (32x32 or 64x64) npz batches.

    Each file is searched separately in ``data_dir`` and ``data_dir/imagenet<S>`` and their
    subfolders ``Imagenet<S>_train_npz``, ``Imagenet<S>_val_npz`` (without ``_npz`` too) and,
    for S=64, ``Imagenet64_train_part1_npz``/``..._part2_npz``. ``data`` rows are
    channel-planar (``reshape(N, 3, S, S)``); 1-based ``labels`` become 0-based. All batches of
    the split are required. The array is allocated once (labels are read first to count the
    images), so peak memory is about the dataset size plus one batch (ImageNet64 train:
    ~15.8 GB).

    Note: Residual Flows and Glow used the older van den Oord et al. (2016) downsampling; the
    npz files of Chrabaszcz et al. are the ones still distributed by image-net.org.
    """
    size = 32 if name == "imagenet32" else 64
    files = (
        [f"train_data_batch_{i}.npz" for i in range(1, 11)]
        if split == "train"
        else ["val_data.npz"]
    )
    subdirs = [f"Imagenet{size}_train_npz", f"Imagenet{size}_val_npz"]
    subdirs += [f"Imagenet{size}_train", f"Imagenet{size}_val"]
    if size == 64:
        subdirs += [f"Imagenet64_train_part{i}{s}" for i in (1, 2) for s in ("_npz", "")]
    bases = [root, root / name] if root is not None else []
    dirs = [d for b in bases for d in (b, *(b / s for s in subdirs))]

    paths: list[Path] = []
    missing: list[str] = []
    for f in files:
        p = next((d / f for d in dirs if (d / f).is_file()), None)
        if p is None:
            missing.append(f)
        else:
            paths.append(p)
    if missing:
        shown = missing if len(missing) <= 3 else [*missing[:2], "...", missing[-1]]
        raise FileNotFoundError(
            f"{name} ({split}): missing file(s) {', '.join(shown)} ({len(missing)} of "
            f"{len(files)}). Looked in: {_fmt_dirs(dirs)}. "
            + ("download=True cannot help: " if download else "")
            + _imagenet_help(size, root)
        )

    counts = []
    for p in paths:  # pass 1: labels only (cheap) -> total count
        with _open_npz(p) as npz:
            labels = _npz_array(npz, "labels", p).reshape(-1)
        if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 1):
            raise ValueError(
                f"{p}: 'labels' must be 1-based integer class indices (got dtype "
                f"{labels.dtype}, min {labels.min() if labels.size else 'n/a'})"
            )
        counts.append(labels.size)
    n_total = sum(counts)
    images = np.empty((n_total, 3, size, size), dtype=np.uint8)
    all_labels = np.empty(n_total, dtype=np.int64)
    start = 0
    for p, n in zip(paths, counts):  # pass 2: fill
        with _open_npz(p) as npz:
            data = _npz_array(npz, "data", p)
            labels = _npz_array(npz, "labels", p).reshape(-1)
        if data.dtype != np.uint8 or data.shape != (n, 3 * size * size):
            raise ValueError(
                f"{p}: 'data' must be uint8 [{n}, {3 * size * size}] (N x 3*{size}*{size}, "
                f"channel-planar), got {data.dtype} {list(data.shape)}"
            )
        images[start : start + n] = data.reshape(n, 3, size, size)
        all_labels[start : start + n] = labels - 1
        start += n
    return torch.from_numpy(images), torch.from_numpy(all_labels), 256


# =============================================================================================
# Image folders (CelebA-HQ, user folders)
# =============================================================================================


def _list_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """All image files below ``folder`` (recursive, sorted, hidden files skipped)."""
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if exclude is not None and p.is_relative_to(exclude):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(p)
    return sorted(files)


def _stored_mode(im: Any) -> str:
    """The pixel layout as stored in the file: Pillow opens 16-bit RGB PNGs as 8-bit
    ``RGB`` (keeping the high byte), so the decoder's raw mode is the one to check."""
    for tile in getattr(im, "tile", None) or ():
        raw = tile.args if isinstance(tile.args, str) else None
        if raw is None and isinstance(tile.args, tuple) and tile.args:
            raw = tile.args[0] if isinstance(tile.args[0], str) else None
        if raw and ";16" in raw:
            return raw
    return str(im.mode)


def _read_image_files(
    files: Sequence[Path], mode: str | None, image_size: int | None
) -> np.ndarray:
    """Read images with Pillow into ``uint8 [N, C, H, W]``.

    ``mode=None`` picks ``"L"`` (one channel) if every image is grayscale (Pillow modes
    ``1``, ``L``, ``LA``) and ``"RGB"`` otherwise; alpha channels are dropped. With
    ``image_size`` each image is center-cropped to a square and resized (Lanczos) to
    ``image_size x image_size``; without it all images must have the same size.
    """
    from PIL import Image

    modes, sizes = [], {}
    for f in files:  # pass 1: headers only
        try:
            with Image.open(f) as im:
                modes.append(im.mode)
                sizes.setdefault(im.size, f)
                stored = _stored_mode(im)
        except Exception as err:
            raise ValueError(f"{f}: cannot read image ({err})") from err
        if stored in ("I", "F") or stored.startswith(("I;", "F;")) or ";16" in stored:
            depth = "16-bit" if "16" in stored else f"32-bit ({stored})"
            raise ValueError(
                f"{f}: a {depth} image; resflow reads 8-bit images (convert it to 8 bits "
                "per channel first)"
            )
    if mode is None:
        mode = "L" if all(m in _GRAY_MODES for m in modes) else "RGB"
    if image_size is None and len(sizes) > 1:
        examples = "; ".join(f"{w}x{h} (e.g. {p})" for (w, h), p in list(sizes.items())[:3])
        raise ValueError(
            f"images have {len(sizes)} different sizes: {examples}. Pass image_size= to "
            "resize them to a common square size"
        )
    if image_size is not None:
        h = w = image_size
    else:
        w, h = next(iter(sizes))
    channels = 1 if mode == "L" else 3
    out = np.empty((len(files), channels, h, w), dtype=np.uint8)
    for i, f in enumerate(files):  # pass 2: pixels
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if image_size is not None:
                    iw, ih = im.size
                    s = min(iw, ih)
                    box = ((iw - s) // 2, (ih - s) // 2, (iw - s) // 2 + s, (ih - s) // 2 + s)
                    im = im.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as err:
            raise ValueError(f"{f}: cannot read image ({err})") from err
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out


def _load_celebahq(
    split: str, root: Path | None, download: bool, image_size: int | None
) -> _Loaded:
    """CelebA-HQ from ``data_dir/celebahq/<split>`` or ``data_dir/<split>`` (RGB, no labels)."""
    dirs = [root / "celebahq" / split, root / split] if root is not None else []
    folder = next((d for d in dirs if d.is_dir() and _list_images(d)), None)
    if folder is None:
        where = root / "celebahq" if root is not None else Path("<data_dir>/celebahq")
        raise FileNotFoundError(
            f"celebahq ({split}): no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found. "
            f"Looked in: {_fmt_dirs(dirs)}. "
            + ("download=True cannot help: " if download else "")
            + "CelebA-HQ (Karras et al. 2018) has no public direct download. Build it with "
            f"dataset_tool.py create_celebahq from {_CELEBAHQ_URL} (or obtain a prepared copy) "
            f"and save the images as PNG files in {where}/train and {where}/test (Glow and "
            "Residual Flows use 27,000 train / 3,000 test images at 256x256)."
        )
    images = _read_image_files(_list_images(folder), "RGB", image_size)
    return torch.from_numpy(images), None, 256


def _load_folder(split: str, root: Path, image_size: int | None) -> _Loaded:
    """A user folder of images (``path``); no labels.

    If ``path/<split>`` exists it is used. Otherwise ``train`` is every image below ``path``
    (excluding a ``test/`` subfolder, if any) and ``test`` is an error.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset: {root} is not a directory")
    if (root / split).is_dir():
        folder, exclude = root / split, None
    elif split == "train":
        folder, exclude = root, root / "test"
    else:
        raise FileNotFoundError(
            f"folder dataset: {root} has no 'test' subfolder, so there is no test split "
            f"(put test images in {root / 'test'} and training images in {root / 'train'})"
        )
    files = _list_images(folder, exclude=exclude)
    if not files:
        raise FileNotFoundError(
            f"folder dataset ({split}): no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"found below {folder}"
        )
    return torch.from_numpy(_read_image_files(files, None, image_size)), None, 256


# =============================================================================================
# .npy arrays
# =============================================================================================

_NPY_SHAPES = "[N, H, W], [N, H, W, C] or [N, C, H, W] with C in {1, 3}, dtype uint8"


def _load_npy(split: str, root: Path) -> _Loaded:
    """A user ``.npy`` array; no labels.

    ``path`` may be a ``.npy`` file (used for ``split="train"`` only) or a folder holding
    ``train.npy`` / ``test.npy``. Layouts: ``[N, H, W]`` (grayscale); ``[N, C, H, W]`` if
    ``shape[1]`` is 1 or 3; otherwise ``[N, H, W, C]`` if ``shape[3]`` is 1 or 3 (so an
    ambiguous ``[N, 3, H, 3]`` is read as channels-first).
    """
    if root.is_dir():
        file = root / f"{split}.npy"
        if not file.is_file():
            raise FileNotFoundError(f"npy dataset ({split}): missing {file}")
    elif root.is_file():
        file = root
        if split != "train":
            raise ValueError(
                f"npy dataset: path={root} is a single file; load it with split='train', or "
                "point path= at a folder holding train.npy and test.npy"
            )
    else:
        raise FileNotFoundError(f"npy dataset: {root} does not exist")
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{file}: cannot read .npy file ({err}); expected {_NPY_SHAPES}") from err
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{file}: expected a single .npy array ({_NPY_SHAPES}), not an .npz")
    if arr.dtype != np.uint8:
        raise ValueError(
            f"{file}: dtype {arr.dtype} is not supported; expected {_NPY_SHAPES} "
            "(convert with arr.astype(np.uint8) after scaling to 0..255)"
        )
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] in (1, 3):
        pass
    elif arr.ndim == 4 and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{file}: shape {list(arr.shape)} is not supported; expected {_NPY_SHAPES}"
        )
    return torch.from_numpy(np.ascontiguousarray(arr)), None, 256
