"""The ``digits`` format: scikit-learn's embedded 8x8 handwritten digits (1,797 images,
values 0..16, so 17 levels). Train is the first 1,500 images, test the last 297 (a fixed,
RNG-free split).

>>> images, labels, levels = read_digits(ImageRequest("digits", "test", None))
>>> tuple(images.shape), images.dtype, levels, labels[:5].tolist()
((297, 1, 8, 8), torch.uint8, 17, [1, 7, 4, 6, 3])
"""

from __future__ import annotations

import numpy as np
import torch

from resflow.data.formats.common import labels_tensor
from resflow.data.registry import DataFormat, ImageRequest, Loaded, register_format

_N_TEST = 297


def read_digits(request: ImageRequest) -> Loaded:
    """scikit-learn digits: train = images[:1500], test = images[1500:] (297 images)."""
    if request.n_bits not in (None, 8):
        raise ValueError(
            "the 'digits' dataset has 17 levels (values 0..16) and cannot be reduced to "
            f"n_bits={request.n_bits}; use n_bits=None"
        )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images).round().astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = np.asarray(bunch.target)
    cut = images.shape[0] - _N_TEST
    sl = slice(None, cut) if request.split == "train" else slice(cut, None)
    return torch.from_numpy(images[sl].copy()), labels_tensor(labels[sl]), 17


DIGITS = register_format(
    DataFormat(
        names=("digits",),
        kind="image",
        read=read_digits,
        description="scikit-learn's 8x8 digits (17 levels, 1,500 train / 297 test)",
    )
)
