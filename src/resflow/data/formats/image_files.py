"""Image files (PNG, JPEG, ...) read with Pillow into ``uint8 [N, C, H, W]`` arrays, with
the checks that refuse images of more than 8 bits per channel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "list_image_files", "read_image_files", "stored_mode"]

#: File extensions (lower case) read by the ``celebahq`` and ``folder`` loaders.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
_GRAY_MODES = frozenset({"1", "L", "LA"})


def list_image_files(folder: Path, exclude: Path | None = None) -> list[Path]:
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


def stored_mode(im: Any) -> str:
    """The pixel layout as stored in the file: Pillow opens 16-bit RGB PNGs as 8-bit
    ``RGB`` (keeping the high byte), so the decoder's raw mode is the one to check."""
    for tile in getattr(im, "tile", None) or ():
        raw = tile.args if isinstance(tile.args, str) else None
        if raw is None and isinstance(tile.args, tuple) and tile.args:
            raw = tile.args[0] if isinstance(tile.args[0], str) else None
        if raw and ";16" in raw:
            return raw
    return str(im.mode)


def read_image_files(files: Sequence[Path], mode: str | None, image_size: int | None) -> np.ndarray:
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
                stored = stored_mode(im)
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
