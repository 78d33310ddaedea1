"""Helpers shared by the image formats: where files are looked for, the messages that say
so, and resizing and labels as tensors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATA_DIR_ENV",
    "fmt_dirs",
    "labels_tensor",
    "require_root",
    "resize_tensor",
    "resolve_root",
    "search_dirs",
    "user_path",
]

#: Environment variable used as ``data_dir`` when the argument is ``None``.
DATA_DIR_ENV = "RESFLOW_DATA_DIR"


def resolve_root(data_dir: str | Path | None) -> Path | None:
    """``data_dir``, else ``$RESFLOW_DATA_DIR``, else ``None``."""
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        return Path(env).expanduser() if env else None
    return Path(data_dir).expanduser()


def user_path(name: str, path: str | Path | None, root: Path | None) -> Path:
    """The file or folder of a format that reads the user's own data: ``path``, else
    ``root``."""
    if path is not None:
        return Path(path).expanduser()
    if root is not None:
        return root
    raise ValueError(f"the {name!r} dataset needs path= (or data_dir=) pointing at your data")


def search_dirs(root: Path | None, name: str, extra: Sequence[str] = ()) -> list[Path]:
    """``root``, ``root/name``, ``root/name/raw`` and ``root/<e>`` for ``e`` in ``extra``.

    >>> [str(d) for d in search_dirs(Path("data"), "mnist")]
    ['data', 'data/mnist', 'data/mnist/raw']
    """
    if root is None:
        return []
    return [root, root / name, root / name / "raw", *(root / e for e in extra)]


def fmt_dirs(dirs: Iterable[Path]) -> str:
    """The searched folders for an error message."""
    dirs = list(dirs)
    if not dirs:
        return f"(nowhere: no data_dir was given and ${DATA_DIR_ENV} is not set)"
    return ", ".join(str(d) for d in dirs)


def require_root(root: Path | None, name: str) -> Path:
    """``root``, or the error that a download has no destination."""
    if root is None:
        raise ValueError(
            f"download=True for {name!r} needs a destination: pass data_dir= or set ${DATA_DIR_ENV}"
        )
    return root


def resize_tensor(images: torch.Tensor, size: int, levels: int) -> torch.Tensor:
    """Resize ``uint8 [N, C, H, W]`` to ``size x size`` (antialiased bilinear, rounded).

    >>> resize_tensor(torch.full((1, 1, 4, 4), 7, dtype=torch.uint8), 2, 256).tolist()
    [[[[7, 7], [7, 7]]]]
    """
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


def labels_tensor(labels: np.ndarray) -> torch.Tensor:
    """Class labels as a contiguous ``int64`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
