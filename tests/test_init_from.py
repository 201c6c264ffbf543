"""``module.init_from``: a new run starts from another model's weights (ours, diffusers', the original repository's),
with its EMA a copy of them; architectures that differ stop in one line."""

import functools

import pytest
import torch
from omegaconf import OmegaConf

from lightning_ldm.conditioning.tokenizer import CaptionTokenizer
from lightning_ldm.diffusion.checkpoint import save_ema_export
from lightning_ldm.errors import CheckpointError
from lightning_ldm.interop.unet import unet_to_diffusers, unet_to_original
from lightning_ldm.latent.first_stage import identity_first_stage
from lightning_ldm.tasks.export import export
from lightning_ldm.unet.model import PRESETS, UNet

from test_pipeline import _randomised
from test_stage2 import CLASSES_ADM
from test_text_to_image import TEXT, text_module

pytest.importorskip("diffusers")


def _source(conditioning=CLASSES_ADM):
    module = text_module(conditioning=conditioning, first_stage=identity_first_stage(image_channels=3))
    _randomised(module.ema.model)
    return module


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def _started_from(path, conditioning=CLASSES_ADM, **kwargs):
    return text_module(conditioning=conditioning, first_stage=identity_first_stage(image_channels=3),
                       init_from=str(path), **kwargs)


def test_a_run_starts_from_our_own_export_with_its_ema_a_copy_of_the_weights(tmp_path):
    source = _source()
    path = save_ema_export(source, tmp_path / "run/export/ldm-ema.safetensors")
    module = _started_from(tmp_path / "run")  # a run directory finds its export
    assert _same(module.unet, source.ema.model["unet"]) and _same(module.conditioner, source.ema.model["conditioner"])
    assert _same(module.ema.model["unet"], module.unet)
    assert module.batch_step == 0
    assert not _same(_source().unet, module.unet)  # a fresh module is different: the comparison can fail
    assert _same(_started_from(path).unet, module.unet)


def test_a_run_starts_from_a_diffusers_unet_and_its_class_table(tmp_path):
    source = _source()
    table = source.ema.model["conditioner"].embedders["class"].table.weight.detach()
    unet_to_diffusers(source.ema.model["unet"], table).save_pretrained(tmp_path / "pipe/unet")
    module = _started_from(tmp_path / "pipe")
    assert _same(module.unet, source.ema.model["unet"])
    assert torch.equal(module.conditioner.embedders["class"].table.weight, table)


def test_a_run_starts_from_an_original_checkpoint_keeping_its_own_null_class(tmp_path):
    source = _source()
    table = source.ema.model["conditioner"].embedders["class"].table.weight.detach()
    state = unet_to_original(source.ema.model["unet"], table[:10])  # openaimodel's label_emb: no null row
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # other models' keys are not read
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    torch.manual_seed(1)
    module = _started_from(tmp_path / "model.ckpt")
    assert _same(module.unet, source.ema.model["unet"])
    ours = module.conditioner.embedders["class"].table.weight
    assert torch.equal(ours[:10], table[:10]) and not torch.equal(ours[10], table[10])


def test_a_text_model_starts_from_its_diffusers_export_with_encoder_and_tokenizer(tmp_path):
    from test_export import _first_stage

    source = text_module(conditioning=TEXT, first_stage=_first_stage())
    _randomised(source.ema.model)
    tokenizer = CaptionTokenizer.train(["a red 3", "a blue 7 left of a green 1"], vocab_size=80, length=12,
                                       progress=False)
    for conditioner in (source.conditioner, source.ema.model["conditioner"]):
        conditioner.embedders["caption"].tokenizer = tokenizer
    path = save_ema_export(source, tmp_path / "run/export/ldm-ema.safetensors")
    export(OmegaConf.create({"paths": {"output_root": str(tmp_path)}, "export": {
        "ckpt": str(path), "output_dir": str(tmp_path / "diffusers"), "use_ema": True, "wandb_artifact": False}}))
    module = text_module(conditioning=TEXT, first_stage=_first_stage(), init_from=str(tmp_path / "diffusers"))
    assert _same(module.unet, source.ema.model["unet"])
    text = module.conditioner.embedders["caption"]
    assert _same(text.encoder, source.ema.model["conditioner"].embedders["caption"].encoder)
    assert text.tokenizer.fingerprint == tokenizer.fingerprint


def test_a_source_of_another_architecture_or_nowhere_stops_in_one_line(tmp_path):
    source = _source()
    unet_to_diffusers(source.ema.model["unet"]).save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError) as error:
        _started_from(tmp_path / "unet", unet=functools.partial(UNet, **{**PRESETS["tiny"], "model_channels": 64}))
    assert "\n" not in str(error.value) and "model_channels" in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        _started_from(tmp_path / "missing")
    torch.save({"state_dict": {"something.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="neither a lightning_ldm stage-2 checkpoint nor an original LDM"):
        _started_from(tmp_path / "other.ckpt")


def test_an_original_text_to_image_checkpoint_gives_its_encoder_when_its_tokenizer_lies_beside_it(tmp_path, capsys):
    from lightning_ldm.interop.text import text_encoder_to_original, tokenizer_to_transformers

    source = _source(TEXT)
    encoder = source.ema.model["conditioner"].embedders["caption"].encoder
    state = {**unet_to_original(source.ema.model["unet"]), **text_encoder_to_original(encoder)}
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    module = _started_from(tmp_path / "model.ckpt", TEXT)  # no tokenizer: the UNet alone, and it says why
    assert _same(module.unet, source.ema.model["unet"])
    assert not _same(module.conditioner.embedders["caption"].encoder, encoder)
    assert "text encoder of" in capsys.readouterr().out
    tokenizer = CaptionTokenizer.train(["a red 3", "a blue 7 left of a green 1"], vocab_size=80, length=12,
                                       progress=False)
    tokenizer_to_transformers(tokenizer).save_pretrained(tmp_path / "tokenizer")
    module = _started_from(tmp_path / "model.ckpt", TEXT)
    text = module.conditioner.embedders["caption"]
    assert _same(text.encoder, encoder) and text.tokenizer.fingerprint == tokenizer.fingerprint
