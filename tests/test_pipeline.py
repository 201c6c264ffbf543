"""The Python API (``lightning_ldm.load_pipeline``): the README's example run as written, the same image per seed
as ``stage=sample``, input images, and one line for each bad input."""

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import lightning_ldm
from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import Autoencoder
from lightning_ldm.diffusion.checkpoint import save_ema_export
from lightning_ldm.errors import CheckpointError, ConfigError, DataError
from lightning_ldm.latent.first_stage import FrozenFirstStage
from lightning_ldm.pipeline import AutoencoderPipeline, LatentDiffusionPipeline
from lightning_ldm.tasks.sample import sample

from test_stage2 import CLASSES_ADM, REPO
from test_text_to_image import text_module

TINY_AUTOENCODER = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4,
                        attn_resolutions=[])


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Every weight random: zero-initialised output layers would make every sample the same."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """outputs/autoencoder/quickstart and outputs/diffusion/quickstart as the quickstart leaves them (tiny models)."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    autoencoder = Autoencoder(**TINY_AUTOENCODER).eval()
    save_autoencoder_export(autoencoder, root / "outputs/autoencoder/quickstart/export/autoencoder.safetensors")
    first_stage = FrozenFirstStage(autoencoder, {"config": autoencoder.config}, latent_channels=4,
                                   downsampling_factor=2, image_channels=3, regularizer="kl", scale_factor=1.0)
    unconditional = text_module(conditioning={}, first_stage=first_stage)
    _randomised(unconditional.ema.model["unet"])
    save_ema_export(unconditional, root / "outputs/diffusion/quickstart/export/ldm-ema.safetensors")
    classes = text_module(conditioning=CLASSES_ADM, first_stage=first_stage)
    _randomised(classes.ema.model)
    save_ema_export(classes, root / "classes/export/ldm-ema.safetensors")
    return root


def _readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(runs, monkeypatch):
    monkeypatch.chdir(runs)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    pipe, images, again = namespace["pipe"], namespace["images"], namespace["again"]
    assert isinstance(pipe, LatentDiffusionPipeline) and pipe.describe() == "unconditional"
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)
    assert (runs / "sample.png").is_file()
    arrays = [np.asarray(i) for i in images]
    assert not np.array_equal(arrays[0], arrays[1])  # each image its own seed
    assert np.array_equal(np.asarray(again[0]), arrays[2])  # seed 2 alone is image 2 of the batch
    assert isinstance(namespace["autoencoder"], AutoencoderPipeline)
    reconstructions = namespace["reconstructions"]
    assert len(reconstructions) == 4 and reconstructions[0].size == (32, 32)


def test_the_pipeline_gives_the_images_stage_sample_writes_for_the_same_seeds(runs, tmp_path):
    export = runs / "classes/export/ldm-ema.safetensors"
    pipe = lightning_ldm.load_pipeline(export, device="cpu")
    assert pipe.num_classes == 10
    ours = pipe(n=3, classes=[7, 2], steps=3, guidance=2.0, seed=5, batch_size=2)
    defaults = OmegaConf.load(REPO / "conf/stage/sample.yaml").sample
    options = {"ckpt": str(export), "accelerator": "cpu", "steps": 3, "batch_size": 3, "num_samples": 3,
               "seed_start": 5, "classes": [7, 2], "guidance_scale": 2.0}
    cfg = OmegaConf.create({"paths": {"run_dir": str(tmp_path / "run"), "output_root": str(tmp_path)},
                            "sample": OmegaConf.merge(defaults, options)})
    sample(cfg)
    for seed, image in zip(range(5, 8), ours):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"run/images/{seed:06d}.png")), np.asarray(image))
    # classes are taken seed mod n: seed 5 -> class 2 (odd), so a call for class 2 alone repeats it
    assert np.array_equal(np.asarray(pipe(n=1, classes=2, steps=3, guidance=2.0, seed=5)[0]), np.asarray(ours[0]))
    assert not np.array_equal(np.asarray(pipe(n=1, classes=7, steps=3, guidance=2.0, seed=5)[0]),
                              np.asarray(ours[0]))


def test_input_images_give_image_to_image_and_inpainting(runs):
    pipe = lightning_ldm.load_pipeline(runs / "outputs/diffusion/quickstart", device="cpu")
    rng = np.random.default_rng(0)
    inputs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    same = pipe(image=inputs, strength=0.0, steps=3)
    assert len(same) == 2
    assert np.abs(np.asarray(same[0], np.int16) - np.asarray(pipe.reconstruct(inputs[0])[0], np.int16)).max() <= 1
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255  # white: generated
    out = pipe(image=inputs, mask=[Image.fromarray(mask)] * 2, steps=3)
    kept = mask == 0
    assert np.array_equal(np.asarray(out[1])[kept], np.asarray(inputs[1])[kept])
    assert not np.array_equal(np.asarray(out[1])[~kept], np.asarray(inputs[1])[~kept])


def test_bad_input_stops_in_one_line(runs, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: give a run directory"):
        lightning_ldm.load_pipeline(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no model"):
        lightning_ldm.load_pipeline(tmp_path)
    pipe = lightning_ldm.load_pipeline(runs / "outputs/diffusion/quickstart", device="cpu")
    with pytest.raises(ConfigError, match="prompts were given but the model is not text-conditioned"):
        pipe(n=1, prompt="a red 3", steps=1)
    with pytest.raises(ConfigError, match="not class-conditional"):
        pipe(n=1, classes=[1], steps=1)
    with pytest.raises(DataError, match="not divisible by the first stage's factor 2"):
        pipe(image=Image.new("RGB", (31, 31)), strength=0.5, steps=1)
    with pytest.raises(ConfigError, match="mask= applies to input images"):
        pipe(mask=Image.new("L", (32, 32)), steps=1)
    with pytest.raises(ConfigError, match="n must be at least 1"):
        pipe(n=0)
    classes = lightning_ldm.load_pipeline(runs / "classes", device="cpu")
    with pytest.raises(ConfigError, match=r"outside \[0, 10\)"):
        classes(n=1, classes=[10], steps=1)


def test_a_diffusers_vae_folder_gives_an_autoencoder_pipeline_that_reconstructs_as_diffusers_does(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = _randomised(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=32, scaling_factor=0.5)).eval()
    vae.save_pretrained(tmp_path / "sd/vae")
    pipe = lightning_ldm.load_pipeline(tmp_path / "sd", device="cpu")  # a pipeline folder: its vae/
    assert isinstance(pipe, AutoencoderPipeline) and float(pipe.first_stage.scale_factor) == 0.5
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    ours = np.asarray(pipe.reconstruct(image)[0]).astype(int)
    theirs = ((expected[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(int)
    assert np.abs(ours - theirs).max() <= 1 and ours.std() > 1  # float rounding at most; not a flat image
    torch.testing.assert_close(pipe.encode(image), vae.encode(pixels).latent_dist.mean * 0.5, atol=1e-5, rtol=0)
