"""Image data sets as quantized ``uint8`` tensors: :class:`ImageData` and :func:`load_images`.

:func:`load_images` reads one split of an image data set from its *original distribution
format* into memory: a ``uint8`` tensor ``[N, C, H, W]`` of integer pixel values in
``0 .. levels-1`` plus optional ``int64`` labels. Nothing is dequantized or normalized
here; a flow model typically maps ``x`` to ``(x + u) / levels`` with ``u ~ U[0, 1)``
(uniform dequantization, Theis et al. 2016, "A note on the evaluation of generative
models") and reports bits per dimension relative to ``levels`` bins per sub-pixel.

Each data set is an image :class:`~resflow.data.registry.DataFormat` of the registry; the
built-in ones (:data:`DATASETS`), one module each in :mod:`resflow.data.formats`:
``digits`` (scikit-learn's 8x8 digits, 17 levels), ``mnist`` / ``fashion-mnist`` (IDX
files), ``cifar10`` (python batches), ``imagenet32`` / ``imagenet64`` (downsampled npz
batches), ``celebahq`` (image files, 5 bits by default), ``folder`` (any folder of images,
``path=``) and ``npy`` (a ``uint8`` array, ``path=``).

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

>>> load_images("digits", "test")
ImageData(name='digits', n=297, shape=(1, 8, 8), levels=17, labels=yes)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from resflow.data import formats as _formats  # noqa: F401  (registers the built-in formats)
from resflow.data.config import DataConfig
from resflow.data.formats.common import DATA_DIR_ENV, resize_tensor, resolve_root
from resflow.data.formats.idx import FASHION_MNIST_SYSTEM_DIR, read_idx
from resflow.data.formats.image_files import IMAGE_EXTENSIONS
from resflow.data.registry import FORMATS, ImageRequest, image_names
from resflow.data.split import DataSplit, carve_valid
from resflow.preprocess.bits import reduce_bits

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ImageData",
    "load_image_data",
    "load_images",
    "read_idx",
]

#: The built-in image data sets (:func:`resflow.data.registry.image_names` also lists
#: those registered later).
DATASETS: tuple[str, ...] = image_names()
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(eq=False, repr=False)
class ImageData:
    """An in-memory image dataset of quantized pixel values.

    Attributes:
        images: ``uint8`` tensor ``[N, C, H, W]`` with values in ``0 .. levels-1``.
        labels: ``int64`` tensor ``[N]`` of class labels, or ``None`` if the source has none.
        levels: Number of quantization levels per sub-pixel (256 for 8-bit data, 17 for
            scikit-learn digits, ``2**n_bits`` after bit reduction).
        name: Dataset name (a registered image data set).
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
        name: A registered image data set (:data:`DATASETS` and any added later).
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
    fmt = FORMATS.get(name) if name in FORMATS else None
    if fmt is None or fmt.kind != "image" or fmt.read is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(image_names())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n_bits is not None and (isinstance(n_bits, bool) or n_bits not in range(1, 9)):
        raise ValueError(f"n_bits must be an integer in 1..8 (or None), got {n_bits!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer (or None), got {image_size!r}")
    if path is not None and not fmt.takes_path:
        users = " and ".join(repr(n) for n, f in FORMATS.items() if f.takes_path)
        raise ValueError(f"path= is only used by the {users} datasets; use data_dir= for {name!r}")
    request = ImageRequest(
        name=name,
        split=split,
        root=resolve_root(data_dir),
        path=path,
        download=download,
        verify=verify,
        progress=progress,
        image_size=image_size,
        n_bits=n_bits,
    )
    images, labels, levels = fmt.read(request)
    if n_bits is None:
        n_bits = fmt.default_bits
    if image_size is not None and not fmt.resizes:
        images = resize_tensor(images, image_size, levels)
    if n_bits is not None and n_bits < 8:
        images = reduce_bits(images, n_bits)
        levels = 2**n_bits
    return ImageData(images=images, labels=labels, levels=levels, name=name)


def load_image_data(cfg: DataConfig) -> DataSplit:
    """The train and test splits of an image data set (:func:`load_images`), with
    ``cfg.n_valid`` random training images held out for validation."""
    kw = dict(download=cfg.download, n_bits=cfg.n_bits, image_size=cfg.image_size, path=cfg.path)
    train = load_images(cfg.name, "train", cfg.data_dir, **kw)  # type: ignore[arg-type]
    test = load_images(cfg.name, "test", cfg.data_dir, **kw)  # type: ignore[arg-type]
    split = DataSplit(
        train.images,
        test.images,
        cfg.name,
        train.levels,
        train_labels=train.labels,
        test_labels=test.labels,
        config=cfg,
    )
    return carve_valid(split, cfg.n_valid, cfg.seed)
