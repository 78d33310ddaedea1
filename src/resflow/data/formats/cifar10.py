"""The ``cifar10`` format: the "python version" pickled batches of CIFAR-10 (Krizhevsky
2009), ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, or the
``cifar-10-python.tar.gz`` archive, which is extracted next to itself on first use.
Unpickling is restricted to the numpy globals a batch needs."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from resflow.data.download import (
    CIFAR10_BATCH_MD5,
    DOWNLOADS,
    RemoteFile,
    download_remote,
    file_md5,
    matches_remote,
)
from resflow.data.formats.common import fmt_dirs, labels_tensor, require_root, search_dirs
from resflow.data.registry import DataFormat, ImageRequest, Loaded, register_format

__all__ = ["read_cifar10"]

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


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


def read_cifar10(request: ImageRequest) -> Loaded:
    """CIFAR-10 python batches.

    Search order: for each of ``data_dir``, ``data_dir/cifar10``, ``data_dir/cifar10/raw``
    the folder ``<dir>/cifar-10-batches-py`` and then ``<dir>`` itself; failing that, the
    first ``<dir>/cifar-10-python.tar.gz`` is extracted into ``<dir>``; failing that, with
    ``download=True``, the archive is downloaded into ``data_dir/cifar10`` and extracted.
    """
    split, root = request.split, request.root
    download, verify, progress = request.download, request.verify, request.progress
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    dirs = search_dirs(root, "cifar10")
    batch_dirs = [b for d in dirs for b in (d / _CIFAR_DIR, d)]
    remote: RemoteFile = DOWNLOADS["cifar10"][0]

    def complete(d: Path) -> bool:
        return all((d / n).is_file() for n in names)

    folder = next((b for b in batch_dirs if complete(b)), None)
    if folder is None:
        archive = next((d / _CIFAR_ARCHIVE for d in dirs if (d / _CIFAR_ARCHIVE).is_file()), None)
        if archive is None and download:
            archive = download_remote(remote, require_root(root, "cifar10") / "cifar10", progress)
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
            f" (and no {_CIFAR_ARCHIVE}). Looked in: {fmt_dirs(batch_dirs)}. Get them with "
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
    return torch.from_numpy(images), labels_tensor(labels), 256


CIFAR10 = register_format(
    DataFormat(
        names=("cifar10",),
        kind="image",
        read=read_cifar10,
        description="CIFAR-10 python batches (32x32 RGB, 50,000 train / 10,000 test)",
    )
)
