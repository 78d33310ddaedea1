"""The ``celebahq`` format: CelebA-HQ (Karras et al. 2018) as a folder of PNG/JPEG files
split into ``train/`` and ``test/``, RGB without labels; reduced to 5 bits by default, as
in Glow (Kingma & Dhariwal 2018) and Residual Flows (Chen et al. 2019)."""

from __future__ import annotations

from pathlib import Path

import torch

from resflow.data.formats.common import fmt_dirs
from resflow.data.formats.image_files import IMAGE_EXTENSIONS, list_image_files, read_image_files
from resflow.data.registry import DataFormat, ImageRequest, Loaded, register_format

__all__ = ["read_celebahq"]

_CELEBAHQ_URL = "https://github.com/tkarras/progressive_growing_of_gans"


def read_celebahq(request: ImageRequest) -> Loaded:
    """CelebA-HQ from ``data_dir/celebahq/<split>`` or ``data_dir/<split>`` (RGB, no labels)."""
    split, root, download = request.split, request.root, request.download
    dirs = [root / "celebahq" / split, root / split] if root is not None else []
    folder = next((d for d in dirs if d.is_dir() and list_image_files(d)), None)
    if folder is None:
        where = root / "celebahq" if root is not None else Path("<data_dir>/celebahq")
        raise FileNotFoundError(
            f"celebahq ({split}): no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found. "
            f"Looked in: {fmt_dirs(dirs)}. "
            + ("download=True cannot help: " if download else "")
            + "CelebA-HQ (Karras et al. 2018) has no public direct download. Build it with "
            f"dataset_tool.py create_celebahq from {_CELEBAHQ_URL} (or obtain a prepared copy) "
            f"and save the images as PNG files in {where}/train and {where}/test (Glow and "
            "Residual Flows use 27,000 train / 3,000 test images at 256x256)."
        )
    images = read_image_files(list_image_files(folder), "RGB", request.image_size)
    return torch.from_numpy(images), None, 256


CELEBAHQ = register_format(
    DataFormat(
        names=("celebahq",),
        kind="image",
        read=read_celebahq,
        resizes=True,
        default_bits=5,
        description="CelebA-HQ image files in train/ and test/ (RGB, 5 bits by default)",
    )
)
