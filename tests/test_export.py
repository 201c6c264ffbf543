"""``stage=export``: a stage-2 model as a diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` loads
offline and samples; for an unconditional model the same images as ours, seed for seed."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lightning_ldm.autoencoder.model import Autoencoder
from lightning_ldm.conditioning.tokenizer import CaptionTokenizer
from lightning_ldm.diffusion.checkpoint import save_ema_export
from lightning_ldm.diffusion.seeds import initial_noise
from lightning_ldm.errors import ConfigError
from lightning_ldm.latent.first_stage import FrozenFirstStage
from lightning_ldm.tasks.export import export

from test_pipeline import TINY_AUTOENCODER, _randomised
from test_stage2 import CLASSES_ADM
from test_text_to_image import TEXT, text_module
from test_text_encoders import clip_folders  # noqa: F401  (a fixture)

diffusers = pytest.importorskip("diffusers")

STEPS = 10  # a divisor of the 1000 training steps: diffusers' DDIM steps to t - T // steps, ours to the next visited t


def _first_stage() -> FrozenFirstStage:
    torch.manual_seed(0)
    autoencoder = _randomised(Autoencoder(**TINY_AUTOENCODER)).eval()
    return FrozenFirstStage(autoencoder, {"config": autoencoder.config}, latent_channels=4, downsampling_factor=2,
                            image_channels=3, regularizer="kl", scale_factor=0.7)


def _export(source, destination, tmp_path, **options):
    cfg = OmegaConf.create({"paths": {"output_root": str(tmp_path / "outputs")},
                            "export": {"ckpt": str(source), "output_dir": destination and str(destination),
                                       "use_ema": True,
                                       "wandb_artifact": False, **options}})
    return export(cfg)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_an_exported_unconditional_model_samples_in_diffusers_as_it_does_here(tmp_path, sampler):
    module = text_module(conditioning={}, first_stage=_first_stage(), prediction="v",
                         sampling={"sampler": sampler, "steps": STEPS})
    _randomised(module.ema.model["unet"])
    source = save_ema_export(module, tmp_path / "run/export/ldm-ema.safetensors")
    folder = _export(source, tmp_path / "exported", tmp_path)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == "LDMPipeline" and pipe.vqvae.config.scaling_factor == pytest.approx(0.7)
    seeds = [3, 4]
    ours, _ = module.generate(2, x_T=initial_noise(seeds, (4, 16, 16)))
    theirs = np.concatenate([pipe(batch_size=1, generator=torch.Generator().manual_seed(s), eta=0.0,
                                  num_inference_steps=STEPS, output_type="np").images for s in seeds])
    ours = ((ours.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    difference, between_seeds = np.abs(ours - theirs).max(), np.abs(ours[0] - ours[1]).max()
    assert difference < 1e-3 * between_seeds, (
        f"{sampler}: diffusers' images differ from ours by up to {difference} (two seeds by {between_seeds})")


def test_a_text_model_exports_its_encoder_and_tokenizer_and_samples_from_prompts(tmp_path):
    module = text_module(conditioning=TEXT, first_stage=_first_stage(), sampling={"sampler": "ddim", "steps": 2})
    tokenizer = CaptionTokenizer.train(["a red 3", "a blue 7 left of a green 1", "a small white 0"], vocab_size=80,
                                       length=12, progress=False)
    for conditioner in (module.conditioner, module.ema.model["conditioner"]):
        conditioner.embedders["caption"].tokenizer = tokenizer
    source = save_ema_export(module, tmp_path / "run/export/ldm-ema.safetensors")
    folder = _export(source, tmp_path / "exported", tmp_path)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == "LDMTextToImagePipeline"
    ids = pipe.tokenizer(["a red 3"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer.encode(["a red 3"])[0].tolist()
    # LDMTextToImagePipeline draws latents of height // 8 whatever the first stage's factor (ours: 2)
    images = pipe(["a red 3"], num_inference_steps=2, guidance_scale=2.0, output_type="np", height=128, width=128,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_a_model_on_a_clip_tower_becomes_a_stable_diffusion_pipeline(tmp_path, clip_folders):  # noqa: F811
    _, flat, _ = clip_folders
    clip = {"caption": {"kind": "clip_text", "path": str(flat), "length": 77, "drop_rate": 0.1}}
    module = text_module(conditioning=clip, first_stage=_first_stage(), sampling={"sampler": "ddim", "steps": 2})
    source = save_ema_export(module, tmp_path / "run/export/ldm-ema.safetensors")
    folder = _export(source, tmp_path / "exported", tmp_path)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    images = pipe("the dog", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)


def test_a_class_conditional_model_samples_with_guidance_in_its_exported_pipeline_as_here(tmp_path):
    module = text_module(conditioning=CLASSES_ADM, first_stage=_first_stage(),
                         sampling={"sampler": "ddim", "steps": STEPS})
    _randomised(module.ema.model)
    source = save_ema_export(module, tmp_path / "run/export/ldm-ema.safetensors")
    folder = _export(source, tmp_path / "exported", tmp_path)
    assert (folder / "pipeline.py").is_file()
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, trust_remote_code=True)
    assert type(pipe).__name__ == "ClassConditionalLDMPipeline" and pipe.null_class == 10
    seeds, labels = [5, 6], torch.tensor([7, 2])
    ours, _ = module.generate(2, labels=labels, guidance_scale=3.0, x_T=initial_noise(seeds, (4, 16, 16)))
    theirs = pipe(labels.tolist(), guidance_scale=3.0, num_inference_steps=STEPS, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ours = ((ours.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    difference, between_seeds = np.abs(ours - theirs).max(), np.abs(ours[0] - ours[1]).max()
    assert difference < 1e-3 * between_seeds, f"differ by up to {difference} (two seeds by {between_seeds})"
    unguided = pipe(labels.tolist(), guidance_scale=1.0, num_inference_steps=STEPS, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert np.abs(unguided - theirs).max() > 100 * difference  # guidance changes the images: the test can fail


def test_bad_exports_stop_in_one_line_and_overwrite_nothing(tmp_path):
    crossattn = {"class": {**CLASSES_ADM["class"], "output": "context", "dim": 32}}
    module = text_module(conditioning=crossattn, first_stage=_first_stage())
    source = save_ema_export(module, tmp_path / "run/export/ldm-ema.safetensors")
    with pytest.raises(ConfigError, match="no pipeline for a latent model conditioned on class through cross-attention"):
        _export(source, tmp_path / "classes", tmp_path)
    assert not (tmp_path / "classes").exists() and not list(tmp_path.glob(".classes*"))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists; nothing was overwritten"):
        _export(source, existing, tmp_path)
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="export.output_dir is not set"):
        _export(source, None, tmp_path)


def test_the_export_can_go_to_the_w_and_b_run_that_trained_it_as_a_model_artifact(tmp_path, monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("WANDB")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    module = text_module(conditioning={}, first_stage=_first_stage())
    source = save_ema_export(module, tmp_path / "run/export/ldm-ema.safetensors")
    (tmp_path / "run/wandb").mkdir()
    (tmp_path / "run/wandb/run_id").write_text("exp12345")
    _export(source, tmp_path / "exported", tmp_path, wandb_artifact=True)
    logs = list((tmp_path / "run/wandb").glob("offline-run-*-exp12345/run-exp12345.wandb"))
    assert logs and b"exported" in logs[0].read_bytes()  # the artifact, named after the folder, in the run's log
