"""Super-resolution pairs and inpainting masks made on the fly: exact where a formula says what they are, seeded."""

import pytest
import torch
import torch.nn.functional as F

from lightning_ldm.data.degradations import inpainting_masks, low_resolution
from lightning_ldm.errors import ConfigError


def _images(n: int = 3, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("factor", [2, 4])
def test_area_downsampling_is_the_mean_of_each_block(factor):
    images = _images()
    low = low_resolution(images, factor)
    assert low.shape == (3, 3, 16 // factor, 16 // factor)
    blocks = images.unfold(2, factor, factor).unfold(3, factor, factor).mean((-1, -2))
    torch.testing.assert_close(low, blocks)
    # the pair is consistent: the target, averaged down, is exactly the input
    torch.testing.assert_close(F.avg_pool2d(images, factor), low)


def test_degradations_are_seeded_and_each_changes_the_input():
    images = _images()
    plain = low_resolution(images, 2, mode="bicubic")
    for option in ({"blur_sigma": (0.5, 1.5)}, {"noise_std": (0.05, 0.1)}, {"jpeg_quality": (30, 60)}):
        first = low_resolution(images, 2, mode="bicubic", generator=torch.Generator().manual_seed(3), **option)
        again = low_resolution(images, 2, mode="bicubic", generator=torch.Generator().manual_seed(3), **option)
        assert torch.equal(first, again) and not torch.allclose(first, plain), option
        assert first.min() >= -1 and first.max() <= 1
    noisy = low_resolution(torch.zeros(1, 1, 64, 64), 2, noise_std=(0.1, 0.1))
    assert abs(float(noisy.std()) - 0.1) < 0.01
    with pytest.raises(ConfigError, match="factor 3 must divide the image size 16x16"):
        low_resolution(images, 3)


@pytest.mark.parametrize("kind", ["box", "strokes"])
def test_masks_are_binary_never_empty_nor_full_and_seeded(kind):
    masks = inpainting_masks(32, 32, kind, generator=torch.Generator().manual_seed(1))
    assert masks.shape == (32, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    covered = masks.flatten(1).mean(1)
    assert (covered > 0).all() and (covered < 1).all()
    assert torch.equal(masks, inpainting_masks(32, 32, kind, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(masks, inpainting_masks(32, 32, kind, generator=torch.Generator().manual_seed(2)))
    if kind == "box":  # one rectangle of a quarter to a half of each side
        rows, cols = masks.amax(3).sum(2).flatten(), masks.amax(2).sum(2).flatten()
        assert ((rows >= 8) & (rows <= 16)).all() and ((cols >= 8) & (cols <= 16)).all()
        assert torch.equal(masks.flatten(1).sum(1), rows * cols)
