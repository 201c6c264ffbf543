"""Sampling from input images with any model: image-to-image (SDEdit) and inpainting by replacement, from the
module's API and from ``stage=sample sample.images=... sample.masks=...``."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lightning_ldm.diffusion.checkpoint import save_ema_export
from lightning_ldm.diffusion.image_inputs import latent_keep_mask, read_input_images
from lightning_ldm.errors import ConfigError, DataError
from lightning_ldm.latent.first_stage import identity_first_stage
from lightning_ldm.tasks.sample import sample

from test_stage2 import REPO
from test_text_to_image import text_module


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return text_module(conditioning={}, first_stage=identity_first_stage(image_channels=3)).eval()


def _inputs(n: int = 2, size: int = 32) -> torch.Tensor:
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1))
    return pixels.float() / 127.5 - 1


def test_strength_0_returns_the_input_and_kept_pixels_are_the_inputs_exactly(module):
    images = _inputs()
    same, spec = module.generate(2, image=images, strength=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, images, rtol=0, atol=1e-6)
    assert spec.timesteps == ()
    keep = torch.zeros(2, 1, 32, 32)
    keep[..., :16] = 1  # the left half stays
    out, _ = module.generate(2, image=images, keep=keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :16], images[..., :16])
    assert not torch.allclose(out[..., 16:], images[..., 16:])


def test_a_latent_is_known_only_if_every_pixel_it_encodes_is():
    keep = torch.ones(1, 1, 8, 8)
    keep[0, 0, 3, 5] = 0  # one generated pixel
    latent = latent_keep_mask(keep, 4)
    assert latent.shape == (1, 1, 2, 2) and latent.flatten().tolist() == [1.0, 0.0, 1.0, 1.0]
    assert torch.equal(latent_keep_mask(keep, 1), keep)


def _write(folder, name: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)


def test_sample_stage_inpaints_a_folder_of_images_and_names_outputs_after_the_inputs(module, tmp_path):
    export = save_ema_export(module, tmp_path / "ldm-ema.safetensors")
    rng = np.random.default_rng(0)
    for name in ("b.png", "sub/a.jpg"):
        _write(tmp_path / "in" / name.rsplit("/", 1)[0] if "/" in name else tmp_path / "in", name.split("/")[-1],
               rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255  # white: generated
        target = tmp_path / "masks" / (name.rsplit("/", 1)[0] if "/" in name else "")
        _write(target, name.split("/")[-1].replace(".jpg", ".png"), mask)
    defaults = OmegaConf.load(REPO / "conf/stage/sample.yaml").sample
    options = {"ckpt": str(export), "accelerator": "cpu", "steps": 2, "batch_size": 1,
               "images": str(tmp_path / "in"), "masks": str(tmp_path / "masks")}
    cfg = OmegaConf.create({"paths": {"run_dir": str(tmp_path / "run"), "output_root": str(tmp_path)},
                            "sample": OmegaConf.merge(defaults, options)})
    sample(cfg)
    out = tmp_path / "run/images"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["b.png", "sub/a.png"]
    source = np.array(Image.open(tmp_path / "in/b.png"))
    result = np.array(Image.open(out / "b.png"))
    kept = np.ones((32, 32), bool)
    kept[8:24, 8:24] = False
    assert np.array_equal(result[kept], source[kept]) and not np.array_equal(result[~kept], source[~kept])
    assert (tmp_path / "run/grid.png").is_file()

    cfg.sample.images, cfg.sample.masks, cfg.sample.strength = None, str(tmp_path / "masks"), 1.0
    with pytest.raises(ConfigError, match="apply to input images: set sample.images"):
        sample(cfg)


def test_bad_input_images_and_masks_stop_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "odd", "x.png", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="30x30, not divisible by the first stage's factor 4"):
        read_input_images(str(tmp_path / "odd"), None, channels=3, factor=4)
    _write(tmp_path / "imgs", "x.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for name, mask, message in [("small", np.zeros((16, 16), np.uint8), "is 16x16, its image x.png 32x32"),
                                ("black", np.zeros((32, 32), np.uint8), "is all black: nothing to generate"),
                                ("white", np.full((32, 32), 255, np.uint8), "is all white: nothing is kept")]:
        _write(tmp_path / name, "x.png", mask)
        with pytest.raises(DataError, match=message) as error:
            read_input_images(str(tmp_path / "imgs"), str(tmp_path / name), channels=3, factor=4)
        assert "\n" not in str(error.value)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="has no mask for x.png"):
        read_input_images(str(tmp_path / "imgs"), str(tmp_path / "none"), channels=3, factor=4)
    with pytest.raises(ConfigError, match="is neither a folder nor a .zip"):
        read_input_images(str(tmp_path / "missing"), None, channels=3, factor=4)
