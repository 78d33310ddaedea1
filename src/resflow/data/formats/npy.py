"""The ``npy`` format: a user's ``uint8`` ``.npy`` array (``path=``) of shape
``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` with ``C`` in {1, 3}; no labels."""

from __future__ import annotations

import numpy as np
import torch

from resflow.data.formats.common import user_path
from resflow.data.registry import DataFormat, ImageRequest, Loaded, register_format

__all__ = ["read_npy"]

_NPY_SHAPES = "[N, H, W], [N, H, W, C] or [N, C, H, W] with C in {1, 3}, dtype uint8"


def read_npy(request: ImageRequest) -> Loaded:
    """A user ``.npy`` array; no labels.

    ``path`` may be a ``.npy`` file (used for ``split="train"`` only) or a folder holding
    ``train.npy`` / ``test.npy``. Layouts: ``[N, H, W]`` (grayscale); ``[N, C, H, W]`` if
    ``shape[1]`` is 1 or 3; otherwise ``[N, H, W, C]`` if ``shape[3]`` is 1 or 3 (so an
    ambiguous ``[N, 3, H, 3]`` is read as channels-first).
    """
    split, root = request.split, user_path(request.name, request.path, request.root)
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


NPY = register_format(
    DataFormat(
        names=("npy",),
        kind="image",
        read=read_npy,
        takes_path=True,
        description="a uint8 .npy array (path=): [N, H, W], [N, H, W, C] or [N, C, H, W]",
    )
)
