"""The ``folder`` format: any folder of image files (``path=``), optionally split into
``train/`` and ``test/``; no labels."""

from __future__ import annotations

import torch

from resflow.data.formats.common import user_path
from resflow.data.formats.image_files import IMAGE_EXTENSIONS, list_image_files, read_image_files
from resflow.data.registry import DataFormat, ImageRequest, Loaded, register_format

__all__ = ["read_folder"]


def read_folder(request: ImageRequest) -> Loaded:
    """A user folder of images (``path``); no labels.

    If ``path/<split>`` exists it is used. Otherwise ``train`` is every image below ``path``
    (excluding a ``test/`` subfolder, if any) and ``test`` is an error.
    """
    split, root = request.split, user_path(request.name, request.path, request.root)
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
    files = list_image_files(folder, exclude=exclude)
    if not files:
        raise FileNotFoundError(
            f"folder dataset ({split}): no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"found below {folder}"
        )
    return torch.from_numpy(read_image_files(files, None, request.image_size)), None, 256


FOLDER = register_format(
    DataFormat(
        names=("folder",),
        kind="image",
        read=read_folder,
        takes_path=True,
        resizes=True,
        description="a folder of image files (path=), optionally with train/ and test/",
    )
)
