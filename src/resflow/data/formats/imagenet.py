"""The ``imagenet32`` / ``imagenet64`` format: downsampled ImageNet npz batches
(Chrabaszcz, Loshchilov & Hutter 2017, arXiv:1707.08819), ``train_data_batch_1..10.npz``
and ``val_data.npz`` with keys ``data`` (``uint8 [N, 3*S*S]``, channel-planar) and
``labels`` (1-based). They need a login at image-net.org and are never downloaded
automatically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from resflow.data.formats.common import fmt_dirs
from resflow.data.registry import DataFormat, ImageRequest, Loaded, register_format

__all__ = ["read_imagenet"]

_IMAGENET_URL = "https://image-net.org/download-images"


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


def read_imagenet(request: ImageRequest) -> Loaded:
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
    name, split, root, download = request.name, request.split, request.root, request.download
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
            f"{len(files)}). Looked in: {fmt_dirs(dirs)}. "
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


IMAGENET = register_format(
    DataFormat(
        names=("imagenet32", "imagenet64"),
        kind="image",
        read=read_imagenet,
        description="downsampled ImageNet npz batches (32x32 or 64x64 RGB)",
    )
)
