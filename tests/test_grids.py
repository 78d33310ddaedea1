import numpy as np
import torch
from PIL import Image

from resflow.evaluation import GRID_GAP, GRID_HEAD, image_grid, save_temperature_grids


def test_temperature_grids_put_each_panel_under_its_heading(tmp_path):
    hot = torch.randint(0, 17, (4, 1, 8, 8))
    cold = torch.randint(0, 17, (9, 1, 8, 8))
    path = save_temperature_grids([(1.0, hot), (0.7, cold)], tmp_path / "s.png", 17, scale=2)
    img = np.asarray(Image.open(path).convert("L"))
    a = np.kron(image_grid(hot, 17), np.ones((2, 2), np.uint8))
    b = np.kron(image_grid(cold, 17), np.ones((2, 2), np.uint8))
    head, gap = GRID_HEAD, GRID_GAP
    assert img.shape == (head + max(a.shape[0], b.shape[0]), a.shape[1] + gap + b.shape[1])
    np.testing.assert_array_equal(img[head : head + a.shape[0], : a.shape[1]], a)
    np.testing.assert_array_equal(img[head:, a.shape[1] + gap :], b)
    for left, width in ((0, a.shape[1]), (a.shape[1] + gap, b.shape[1])):
        assert (img[:head, left : left + width] < 128).any()  # the "T = ..." heading
    assert not list(tmp_path.glob("*.tmp"))
