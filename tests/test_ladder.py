"""The degradation ladder beside custom-extractor Frechet distances: each rung does what its name says."""

import pytest
import torch
import torch.nn.functional as F

from lightning_ldm.metrics.ladder import degrade


@pytest.mark.parametrize("channels", [1, 3])
def test_every_rung_keeps_the_shape_and_does_what_it_says(channels):
    images = torch.randint(0, 256, (16, channels, 12, 12), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    generator = torch.Generator().manual_seed(1)
    assert degrade(images, "real digits", generator) is images
    for rung in ("jpeg q50", "blur 3x3", "noise 0.2", "pure noise", "1 in 8 blank"):
        out = degrade(images, rung, generator)
        assert out.shape == images.shape and out.dtype == torch.uint8 and not torch.equal(out, images), rung
    x = images.float() / 127.5 - 1
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    expected = ((blurred + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(degrade(images, "blur 3x3", generator), expected)
    noise = (degrade(torch.full_like(images, 128), "noise 0.2", generator).float() - 128) / 127.5
    assert abs(float(noise.std()) - 0.2) < 0.02
    blank = degrade(images, "1 in 8 blank", generator).flatten(1)
    assert int(((blank == 0).all(1) | (blank == 255).all(1)).sum()) == 2
    # JPEG loses detail but keeps the image: far closer to the input than to noise
    error = (degrade(images, "jpeg q50", generator).float() - images.float()).abs().mean()
    assert 0 < error < (degrade(images, "pure noise", generator).float() - images.float()).abs().mean()
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(images, "sepia", generator)
