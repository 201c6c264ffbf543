"""Text-to-image end to end at a toy size: captions -> a tokenizer learned from them -> a jointly trained text
encoder the UNet attends to -> checkpoints and exports that sample from prompts on their own."""

import json
import types

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lightning_ldm.data.captioned_digits import CaptionedDigitsDataModule
from lightning_ldm.diffusion.checkpoint import load_diffusion_model, save_ema_export
from lightning_ldm.diffusion.legacy import upgrade_config, upgrade_state_dict
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError
from lightning_ldm.latent.first_stage import identity_first_stage
from lightning_ldm.tasks.sample import sample
from lightning_ldm.unet.model import PRESETS, UNet
import functools

from test_stage2 import REPO, make_trainer

TINY_UNET = functools.partial(UNet, **PRESETS["tiny"])
TEXT = {"caption": {"kind": "text", "input_key": "caption", "vocab_size": 80, "length": 12, "dim": 32, "depth": 1,
                    "heads": 2, "dim_head": 16, "drop_rate": 0.2}}
PROMPTS = ["a red 3", "a large blue 7 left of a small green 1"]


def text_module(**kwargs) -> DiffusionModule:
    options = dict(first_stage=identity_first_stage(image_channels=3), unet=TINY_UNET, schedule=NoiseSchedule(),
                   image_size=32, conditioning=TEXT, num_log_images=0, lr=2e-3, ema_decay=0.9, sampling={"steps": 3})
    return DiffusionModule(**{**options, **kwargs})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt2img")
    data = CaptionedDigitsDataModule(num_scenes=48, image_size=32, batch_size=4, num_workers=0, val_fraction=0.1)
    module = text_module()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "diffusion/run/checkpoints", save_last=True)
    trainer = make_trainer(root / "diffusion/run", 4, callbacks=[checkpoints], enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    module.eval()
    return types.SimpleNamespace(root=root, module=module, trainer=trainer, data=data,
                                 last=root / "diffusion/run/checkpoints/last.ckpt")


def _images(module, prompts, **options):
    """The images of ``prompts``, every one from the same starting noise."""
    n = len(prompts)
    shape = (1, module.first_stage.latent_channels, module.latent_size, module.latent_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5)).expand(n, -1, -1, -1).contiguous()
    return module.generate(n, prompts=prompts, x_T=x_T, generator=torch.Generator().manual_seed(0), **options)[0]


def test_the_tokenizer_is_learned_from_the_training_captions_and_the_encoder_trains_with_the_unet(trained):
    module, trainer = trained.module, trained.trainer
    text = module.conditioner.embedders["caption"]
    words = {word for caption in trained.data.training_captions() for word in caption.split()}
    ids, _ = text.tokenizer.encode(["a large blue 7"])
    assert text.tokenizer.decode(ids)[0] == "a large blue 7" and {"blue", "left"} <= words
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in text.parameters()} <= optimised  # trained jointly (cond_stage_trainable)
    averaged = module.ema.model["conditioner"].embedders["caption"]
    assert averaged.tokenizer is text.tokenizer  # the EMA copy reads the same token ids
    assert not torch.equal(next(averaged.parameters()), next(text.parameters()))  # its own average
    assert module.evaluation_prompts and module.validation_prompts  # the validation captions by default


def test_a_checkpoint_and_an_export_alone_sample_from_prompts(trained, tmp_path):
    expected = _images(trained.module, PROMPTS, guidance_scale=3.0)
    loaded = load_diffusion_model(str(trained.last)).eval()
    assert loaded.conditioner.embedders["caption"].tokenizer.fingerprint == \
        trained.module.conditioner.embedders["caption"].tokenizer.fingerprint
    torch.testing.assert_close(_images(loaded, PROMPTS, guidance_scale=3.0), expected, rtol=0, atol=1e-6)
    export = load_diffusion_model(str(save_ema_export(trained.module, tmp_path / "ldm-ema.safetensors"))).eval()
    torch.testing.assert_close(_images(export, PROMPTS, guidance_scale=3.0), expected, rtol=0, atol=1e-6)


def test_the_prompt_and_the_negative_prompt_steer_the_image(trained):
    module = trained.module
    same_prompt = _images(module, [PROMPTS[0], PROMPTS[0]], guidance_scale=3.0)
    torch.testing.assert_close(same_prompt[0], same_prompt[1])  # same prompt, same noise: the same image
    mixed = _images(module, PROMPTS, guidance_scale=3.0)
    torch.testing.assert_close(mixed[0], same_prompt[0])
    assert (mixed[1] - mixed[0]).abs().max() > 1e-3  # another prompt on the same noise: another image
    negative = _images(module, PROMPTS, guidance_scale=3.0, negative_prompt="a green 1")
    assert (negative - mixed).abs().max() > 1e-3
    unguided = _images(module, PROMPTS, guidance_scale=1.0, negative_prompt="a green 1")
    torch.testing.assert_close(unguided, _images(module, PROMPTS, guidance_scale=1.0))  # no guidance, no negative


def test_captions_are_dropped_to_the_empty_caption_at_the_configured_rate(trained):
    conditioner = trained.module.conditioner
    captions = [PROMPTS[1]] * 4000
    cond = conditioner({"caption": captions}, torch.device("cpu"), drop=True,
                       generator=torch.Generator().manual_seed(0))["context"].detach()
    null = conditioner({"caption": [""]}, torch.device("cpu"))["context"].detach()[0]
    full = conditioner({"caption": captions[:1]}, torch.device("cpu"))["context"].detach()[0]
    dropped = torch.tensor([torch.allclose(row, null, atol=1e-6) for row in cond])
    kept = torch.tensor([torch.allclose(row, full, atol=1e-6) for row in cond])
    assert bool((dropped ^ kept).all())  # each caption either kept whole or replaced by the empty one
    assert abs(dropped.float().mean().item() - 0.2) < 0.035  # 5 standard deviations at n = 4000


def test_sample_stage_takes_prompts_from_a_file_and_writes_a_captioned_folder(trained, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red 3\n\na small green 7 above a large blue 1\n")
    defaults = OmegaConf.load(REPO / "conf/stage/sample.yaml").sample
    options = {"ckpt": str(trained.last), "accelerator": "cpu", "steps": 2, "num_samples": 3, "batch_size": 2,
               "prompt_file": str(prompt_file), "guidance_scale": 2.0}
    cfg = OmegaConf.create({"paths": {"run_dir": str(tmp_path / "run"), "output_root": str(trained.root)},
                            "sample": OmegaConf.merge(defaults, options)})
    sample(cfg)
    images = tmp_path / "run/images"
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "000000.png", "text": "a red 3"},
                    {"file_name": "000001.png", "text": "a small green 7 above a large blue 1"},
                    {"file_name": "000002.png", "text": "a red 3"}]  # prompt i mod n for seed i
    assert np.array(Image.open(images / "000000.png")).shape == (32, 32, 3)
    grid = np.array(Image.open(tmp_path / "run/grid.png"))
    assert grid.shape[0] > 2 * 128 and grid.shape[2] == 3  # 128-pixel tiles with their prompts below

    cfg.sample.prompt_file = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"^sample.prompt_file .*missing.txt does not exist"):
        sample(cfg)
    cfg.sample.prompt_file, cfg.sample.prompts = None, None
    with pytest.raises(ConfigError, match="the model is text-conditioned: give prompts"):
        sample(cfg)


def test_text_conditioning_without_captions_and_prompts_without_text_stop_in_one_line(tmp_path):
    from few_digits import FewDigits

    module = text_module(first_stage=identity_first_stage(image_channels=1))
    with pytest.raises(ConfigError, match=r"^text conditioning needs captions, and data .* has none") as error:
        make_trainer(tmp_path, 1).fit(module, datamodule=FewDigits(batch_size=4))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="give 2 prompts"):
        module.generate(2)
    plain = text_module(conditioning={})
    with pytest.raises(ConfigError, match="prompts were given but this model is not text-conditioned"):
        plain.generate(2, prompts=PROMPTS)
    with pytest.raises(ConfigError, match="is the old form: choose the config group"):
        text_module(conditioning="crossattn")


def test_checkpoints_of_the_class_conditional_layout_before_the_conditioner_still_load():
    old = {"conditioning": "adm", "num_classes": 10, "unet": {**PRESETS["tiny"], "context_dim": None}}
    upgraded_config = upgrade_config(old)
    spec = upgraded_config["conditioning"]
    assert spec == {"class": {"kind": "class", "num_classes": 10, "output": "vector",
                              "dim": 4 * PRESETS["tiny"]["model_channels"], "drop_rate": 0.1}}
    assert "context_dim" not in upgraded_config["unet"]
    module = text_module(first_stage=identity_first_stage(image_channels=1), conditioning=spec)
    current = module.state_dict()
    table = torch.randn(11, module.conditioner.embedders["class"].dim)
    legacy = {}
    for key, value in current.items():
        if key.startswith("ema.model.unet."):
            legacy["ema.model." + key[len("ema.model.unet."):]] = value
        elif not key.startswith(("conditioner.", "ema.model.conditioner.")):
            legacy[key] = value
    legacy["unet.label_embed.weight"] = table
    legacy["ema.model.label_embed.weight"] = table + 1
    upgraded = upgrade_state_dict(legacy, module.conditioner)
    assert set(upgraded) == set(current)
    torch.testing.assert_close(upgraded["conditioner.embedders.class.table.weight"], table)
    torch.testing.assert_close(upgraded["ema.model.conditioner.embedders.class.table.weight"], table + 1)
