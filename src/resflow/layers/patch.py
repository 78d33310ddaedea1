"""Images as sequences of patches: ``[B, C, H, W] <-> [B, T, C p^2]`` (logdet 0).

The image is cut into non-overlapping ``p x p`` patches, read row by row (raster
order), each flattened channel-major into one token of ``C * p^2`` features:
``T = (H / p) * (W / p)`` tokens. A permutation of the elements, so the logdet is 0;
TarFlow's blocks work on these sequences (Zhai et al. 2025).
"""

from __future__ import annotations

from torch import Tensor

from resflow.layers.base import FlowLayer, Shape, zero_logdet


class Patchify(FlowLayer):
    """``[B, C, H, W] -> [B, (H/p)(W/p), C p^2]`` for images of ``shape = (C, H, W)``;
    the inverse reassembles the image.

    Example:
        >>> import torch
        >>> layer = Patchify((1, 4, 4), 2)
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> y, logdet = layer(x)
        >>> y.shape, layer.output_shape((1, 4, 4))
        (torch.Size([1, 4, 4]), (4, 4))
        >>> y[0, 1].tolist()  # the top-right patch
        [2.0, 3.0, 6.0, 7.0]
        >>> torch.equal(layer.inverse(y), x)
        True
    """

    def __init__(self, shape: Shape, patch_size: int) -> None:
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"Patchify expects images (C, H, W), got {tuple(shape)}")
        if patch_size < 1:
            raise ValueError(f"the patch size must be >= 1, got {patch_size}")
        c, h, w = shape
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"the image size {h}x{w} is not a multiple of the patch size {patch_size}"
            )
        self.shape = tuple(shape)
        self.patch_size = patch_size
        self.grid = (h // patch_size, w // patch_size)

    def _check(self, shape: Shape) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(f"Patchify expects images {self.shape}, got {tuple(shape)}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(tuple(x.shape[1:]))
        (c, _, _), (gh, gw), p = self.shape, self.grid, self.patch_size
        tokens = x.reshape(-1, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return tokens.reshape(-1, gh * gw, c * p * p), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        (c, h, w), (gh, gw), p = self.shape, self.grid, self.patch_size
        image = y.reshape(-1, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return image.reshape(-1, c, h, w)

    def inverse_and_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inverse(y, context), zero_logdet(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        self._check(tuple(input_shape))
        return (self.grid[0] * self.grid[1], self.shape[0] * self.patch_size**2)
