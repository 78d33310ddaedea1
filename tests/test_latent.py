"""Latent-space tools (RealNVP §5, Appendix C/D): the manifold of four images,
conceptual compression, and sampling at a larger resolution."""

from __future__ import annotations

import pytest
import torch

from resflow.latent import conceptual_compression, latent_parts, manifold_interpolation
from resflow.models import build_model, get_preset


def _trained_ish(name: str, **kw):
    torch.manual_seed(0)
    model = build_model(get_preset(name, **kw))
    model(torch.randint(0, model.levels, (32, *model.shape)))  # data-dependent init
    with torch.no_grad():  # move away from the identity-like start
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_manifold_corners_are_the_four_images():
    model = _trained_ish("realnvp-digits")
    images = torch.randint(0, 17, (4, 1, 8, 8))
    torch.manual_seed(5)
    grid = manifold_interpolation(model, images, steps=5)
    assert grid.shape == (25, 1, 8, 8)
    corners = grid[[0, 4, 20, 24]]  # (0, 0), (0, pi/2), (pi/2, 0), (pi/2, pi/2)
    torch.testing.assert_close(corners, images.to(grid.dtype))
    # the middle point is the formula's mix, decoded (the same dequantization noise)
    torch.manual_seed(5)
    z, _ = model(images)
    c = torch.cos(torch.tensor(torch.pi / 4))
    mid = c * (c * z[0] + c * z[1]) + c * (c * z[2] + c * z[3])
    torch.testing.assert_close(grid[12], model.inverse(mid[None])[0])


def test_conceptual_compression_keeps_the_coarsest_latents():
    model = _trained_ish("realnvp-mnist", hidden=8, n_blocks=1)
    assert latent_parts(model) == [392, 196, 196]
    images = torch.randint(0, 256, (2, 1, 28, 28))
    torch.manual_seed(1)
    grid, kept = conceptual_compression(model, images)
    assert kept == [1.0, 0.5, 0.25]
    rows = grid.view(2, 3, 1, 28, 28)
    torch.testing.assert_close(rows[:, 0], images.to(grid.dtype))  # all latents kept
    z, _ = model(images)
    for j, share in enumerate(kept):
        start = int(784 * (1 - share))
        z_j, _ = model(rows[:, j].round().long())
        # re-encoding the decoded image recovers the kept (coarse) part of the latent,
        # up to the quantization of the decoded image to integer levels
        assert (z_j[:, start:] - z[:, start:]).abs().mean() < 0.2 * z[:, start:].abs().mean()
    assert not torch.equal(rows[:, 2], rows[:, 0])


def test_compression_needs_a_multiscale_latent():
    model = build_model(get_preset("glow-toy2d"))
    with pytest.raises(ValueError, match="multi-scale latent"):
        conceptual_compression(model, torch.randn(2, 2))


def test_fully_convolutional_model_samples_at_a_larger_resolution():
    small = _trained_ish("realnvp-digits")
    big = build_model(get_preset("realnvp-digits", image_shape=(1, 16, 16)))
    big.load_state_dict(small.state_dict())  # no parameter depends on the image size
    big.eval()
    x = big.sample(3, temperature=0.8)
    assert x.shape == (3, 1, 16, 16) and x.min() >= 0 and x.max() <= 16
    glow_small = build_model(get_preset("glow-digits"))
    glow_big = build_model(get_preset("glow-digits", image_shape=(1, 16, 16)))
    with pytest.raises(RuntimeError, match="size mismatch"):  # the learned top prior
        glow_big.load_state_dict(glow_small.state_dict())
