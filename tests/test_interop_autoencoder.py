"""The stage-1 autoencoder in from the original CompVis layout and diffusers, and out to diffusers: the same
encodings and decodings, and one-line errors for what does not fit."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.config.validate import validate_config
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.interop.autoencoder import (autoencoder_from_diffusers, autoencoder_to_diffusers,
                                               load_pretrained_autoencoder, pretrained_autoencoder_kind)
from lightning_ldm.latent.first_stage import FrozenFirstStage, load_first_stage

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-5
TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16, z_channels=4, embed_dim=4, dropout=0.0,
            attn_resolutions=[])
KL = dict(TINY, regularizer="kl")
VQ = dict(TINY, regularizer="vq", codebook_size=16)
ATTENTION = [[], [8], [16, 8]]  # none but the mid block's; at the lower level; at both levels


def tiny(config: dict, seed: int = 0) -> Autoencoder:
    """A random Autoencoder whose every parameter matters: GroupNorm affines off their 1/0 init (a swapped norm
    key would go unnoticed otherwise), VQ codes spread like the latents (the default init packs them near 0)."""
    torch.manual_seed(seed)
    model = Autoencoder(**config).eval()
    randomise(model)
    return model


def randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 0.5)


def images(size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def diffusers_kl(attention: list[int], scaling_factor: float = 0.4, seed: int = 2):
    """A random diffusers AutoencoderKL of the TINY shape, attention at the levels of ``attention``."""
    torch.manual_seed(seed)
    down = ["AttnDownEncoderBlock2D" if 16 // 2**i in attention else "DownEncoderBlock2D" for i in range(2)]
    up = [t.replace("DownEncoder", "UpDecoder") for t in reversed(down)]
    model = diffusers.AutoencoderKL(block_out_channels=[32, 64], down_block_types=down, up_block_types=up,
                                    layers_per_block=1, latent_channels=4, sample_size=16,
                                    scaling_factor=scaling_factor).eval()
    randomise(model)
    return model


def diffusers_vq(seed: int = 3):
    torch.manual_seed(seed)
    model = diffusers.VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                              up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4,
                              sample_size=16, num_vq_embeddings=16, vq_embed_dim=4).eval()
    randomise(model)
    return model


def assert_same_as_diffusers(ours: Autoencoder, theirs, x: torch.Tensor) -> None:
    """Our encode / decode against diffusers' own forward passes on the same input."""
    with torch.no_grad():
        if ours.regularizer == "kl":
            posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
            assert_close(posterior.mean, reference.mean)
            assert_close(posterior.std, reference.std)
            assert_close(ours.decode(posterior.mean), theirs.decode(reference.mean).sample)
            return
        latents = ours.encode(x).mean  # VQ: the pre-quantisation latent, diffusers' encode(x).latents
        assert_close(latents, theirs.encode(x).latents)
        quantized = ours.quantize.straight_through(latents)
        assert_close(quantized, theirs.quantize(latents)[0])
        assert ours.quantize.nearest_code(latents).unique().numel() > 1  # the codebook's mapping is exercised
        assert_close(ours.decode(latents), theirs.decode(latents).sample)  # both quantise before decoding
        assert_close(ours.decoder(ours.post_quant_conv(latents)),
                     theirs.decode(latents, force_not_quantize=True).sample)


# --------------------------------------------------------------------------- ours -> diffusers
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_ours_to_diffusers_encodes_and_decodes_the_same(regularizer, attention):
    model = tiny(dict(KL if regularizer == "kl" else VQ, attn_resolutions=attention))
    theirs = autoencoder_to_diffusers(model, scaling_factor=0.3).eval()

    assert type(theirs).__name__ == ("AutoencoderKL" if regularizer == "kl" else "VQModel")
    config = theirs.config
    down = ["AttnDownEncoderBlock2D" if 16 // 2**i in attention else "DownEncoderBlock2D" for i in range(2)]
    assert list(config.down_block_types) == down
    assert list(config.up_block_types) == [t.replace("DownEncoder", "UpDecoder") for t in reversed(down)]
    assert (list(config.block_out_channels), config.layers_per_block, config.latent_channels) == ([32, 64], 1, 4)
    assert (config.norm_num_groups, config.sample_size, config.scaling_factor) == (32, 16, 0.3)
    assert config.mid_block_add_attention and config.force_upcast and config.act_fn == "silu"
    if regularizer == "kl":
        assert config.use_quant_conv and config.use_post_quant_conv
    else:
        assert (config.num_vq_embeddings, config.vq_embed_dim, config.norm_type) == (16, 4, "group")
    assert_same_as_diffusers(model, theirs, images())


def test_diffusers_norms_use_the_same_epsilon_as_ours():
    theirs = autoencoder_to_diffusers(tiny(dict(KL, attn_resolutions=[8])), scaling_factor=1.0)
    epsilons = {module.eps for module in theirs.modules() if isinstance(module, torch.nn.GroupNorm)}
    assert epsilons == {1e-6}


def test_round_trip_through_diffusers_keeps_config_and_weights():
    model = tiny(dict(VQ, attn_resolutions=[8]))
    back, scale = autoencoder_from_diffusers(autoencoder_to_diffusers(model, scaling_factor=0.7))
    assert scale == pytest.approx(0.7)
    assert back.config == model.config
    assert list(back.state_dict()) == list(model.state_dict())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_what_diffusers_cannot_hold_is_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        autoencoder_to_diffusers(tiny(dict(KL, ch_mult=[2, 2])), scaling_factor=1.0)
    assert_one_line(error, "ch_mult=[2, 2]", "start with 1")
    with pytest.raises(ConfigError) as error:
        autoencoder_to_diffusers(tiny(dict(KL, embed_dim=3)), scaling_factor=1.0)
    assert_one_line(error, "embed_dim=3 != z_channels=4", "AutoencoderKL")
    # resolution 30: encoder levels 30, 15, 7 but decoder levels 7, 14, 28: attention at 15 is in the encoder only
    with pytest.raises(ConfigError) as error:
        autoencoder_to_diffusers(tiny(dict(KL, ch_mult=[1, 1, 1], resolution=30, attn_resolutions=[15])), 1.0)
    assert_one_line(error, "attn_resolutions=[15]", "different levels")


# --------------------------------------------------------------------------- diffusers -> ours
@pytest.mark.parametrize("attention", ATTENTION)
def test_diffusers_kl_folder_loads_the_same(tmp_path, attention):
    theirs = diffusers_kl(attention)
    theirs.save_pretrained(tmp_path / "vae")
    model, scale = load_pretrained_autoencoder(tmp_path / "vae")
    assert scale == pytest.approx(0.4)
    assert model.config == dict(Autoencoder(**dict(KL, attn_resolutions=attention)).config)
    assert_same_as_diffusers(model, theirs, images(seed=4))


def test_diffusers_vq_folder_loads_the_same(tmp_path):
    theirs = diffusers_vq()
    theirs.save_pretrained(tmp_path / "vqvae")
    model, scale = load_pretrained_autoencoder(str(tmp_path / "vqvae"))
    assert scale == pytest.approx(0.18215)  # VQModel's default, written to its config
    assert model.config == Autoencoder(**VQ).config
    assert_same_as_diffusers(model, theirs, images(seed=5))


@pytest.mark.parametrize("subfolder", ["vae", "vqvae"])
def test_a_pipeline_folder_loads_its_autoencoder(tmp_path, subfolder):
    theirs = diffusers_kl([8]) if subfolder == "vae" else diffusers_vq()
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                                    subfolder: ["diffusers", type(theirs).__name__]}))
    theirs.save_pretrained(tmp_path / "pipe" / subfolder)
    model, _ = load_pretrained_autoencoder(tmp_path / "pipe")
    assert_same_as_diffusers(model, theirs, images(seed=6))
    # the weights file itself names its folder
    model, _ = load_pretrained_autoencoder(tmp_path / "pipe" / subfolder / "diffusion_pytorch_model.safetensors")
    assert_same_as_diffusers(model, theirs, images(seed=7))


def test_a_config_given_for_a_diffusers_folder_must_match_and_sets_the_rest(tmp_path):
    diffusers_kl([8]).save_pretrained(tmp_path / "vae")
    model, _ = load_pretrained_autoencoder(tmp_path / "vae", dict(KL, resolution=32, attn_resolutions=[16]))
    assert model.config["resolution"] == 32  # same architecture: attention at level 1 either way

    with pytest.raises(ConfigError) as error:
        load_pretrained_autoencoder(tmp_path / "vae", dict(KL, ch_mult=[1, 1], attn_resolutions=[8]))
    assert_one_line(error, str(tmp_path / "vae"), "differs", "ch_mult [1, 1] vs [1, 2]")
    with pytest.raises(ConfigError) as error:
        load_pretrained_autoencoder(tmp_path / "vae", KL)
    assert_one_line(error, "attention_levels [] vs [1]")


@pytest.mark.parametrize("change,fragment", [
    (dict(act_fn="gelu"), "act_fn='gelu'"),
    (dict(norm_num_groups=16), "norm_num_groups=16"),
    (dict(shift_factor=0.1), "shift_factor"),
    (dict(use_quant_conv=False), "use_quant_conv=false"),
    (dict(mid_block_add_attention=False), "mid_block_add_attention=false"),
    (dict(block_out_channels=[64, 96]), "block_out_channels=[64, 96]"),
    (dict(down_block_types=["DownBlock2D", "DownEncoderBlock2D"]), "down_block_types"),
])
def test_diffusers_settings_that_do_not_map_are_refused_in_one_line(change, fragment):
    settings = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4, sample_size=16)
    settings.update(change)
    if "DownBlock2D" in settings["down_block_types"]:  # builds only with a time embedding: check the config alone
        from lightning_ldm.interop.autoencoder import config_from_diffusers

        with pytest.raises(ConfigError) as error:
            config_from_diffusers("AutoencoderKL", settings)
    else:
        with pytest.raises(ConfigError) as error:
            autoencoder_from_diffusers(diffusers.AutoencoderKL(**settings))
    assert_one_line(error, "diffusers AutoencoderKL", fragment, "does not map")


# --------------------------------------------------------------------------- the original CompVis layout
def _params(*layers: str) -> list[str]:
    return [f"{layer}.{param}" for layer in layers for param in ("weight", "bias")]


def _resnet(prefix: str, shortcut: bool = False) -> list[str]:
    layers = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
    return _params(*(f"{prefix}.{layer}" for layer in layers))


def _attention(prefix: str) -> list[str]:
    return _params(*(f"{prefix}.{layer}" for layer in ("norm", "q", "k", "v", "proj_out")))


# The key names of ldm/modules/diffusionmodules/model.py Encoder / Decoder and ldm/models/autoencoder.py
# AutoencoderKL for ch 32, ch_mult [1, 2], num_res_blocks 1, attention at resolution 8 (level 1) of 16.
ORIGINAL_KL_KEYS = [
    *_params("encoder.conv_in"),
    *_resnet("encoder.down.0.block.0"), *_params("encoder.down.0.downsample.conv"),
    *_resnet("encoder.down.1.block.0", shortcut=True), *_attention("encoder.down.1.attn.0"),
    *_resnet("encoder.mid.block_1"), *_attention("encoder.mid.attn_1"), *_resnet("encoder.mid.block_2"),
    *_params("encoder.norm_out", "encoder.conv_out"),
    *_params("decoder.conv_in"),
    *_resnet("decoder.mid.block_1"), *_attention("decoder.mid.attn_1"), *_resnet("decoder.mid.block_2"),
    *_resnet("decoder.up.1.block.0"), *_attention("decoder.up.1.attn.0"),
    *_resnet("decoder.up.1.block.1"), *_attention("decoder.up.1.attn.1"), *_params("decoder.up.1.upsample.conv"),
    *_resnet("decoder.up.0.block.0", shortcut=True), *_resnet("decoder.up.0.block.1"),
    *_params("decoder.norm_out", "decoder.conv_out"),
    *_params("quant_conv", "post_quant_conv"),
]  # fmt: skip
ORIGINAL_VQ_KEYS = [*ORIGINAL_KL_KEYS, "quantize.embedding.weight"]  # taming's VectorQuantizer2.embedding
KL_WITH_ATTENTION = dict(KL, attn_resolutions=[8])
VQ_WITH_ATTENTION = dict(VQ, attn_resolutions=[8])
ORIGINAL = {"kl": (KL_WITH_ATTENTION, ORIGINAL_KL_KEYS), "vq": (VQ_WITH_ATTENTION, ORIGINAL_VQ_KEYS)}


def original_state(reference: Autoencoder, keys: list[str]) -> dict[str, torch.Tensor]:
    """The reference's weights under the original key names, written out above (not taken from our model)."""
    ours = reference.state_dict()
    assert sorted(keys) == sorted(ours)  # our layout is the original's, key for key
    assert ours["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # attention projections are 1x1 convs
    return {key: ours[key].clone() for key in keys}


def full_ldm_checkpoint(reference: Autoencoder, keys: list[str]) -> dict:
    """A LatentDiffusion checkpoint: first_stage_model.* besides the UNet, its EMA, the text encoder, buffers."""
    state = {f"first_stage_model.{key}": value for key, value in original_state(reference, keys).items()}
    state.update({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
                  "model_ema.diffusion_modelinput_blocks00weight": torch.randn(8, 4, 3, 3),
                  "model_ema.decay": torch.tensor(0.9999), "cond_stage_model.transformer.token_emb.weight":
                  torch.randn(10, 8), "betas": torch.linspace(1e-4, 2e-2, 10), "scale_factor": torch.tensor(0.25)})
    return {"state_dict": state, "global_step": 10, "epoch": 1}


def bare_autoencoder_checkpoint(reference: Autoencoder, keys: list[str]) -> dict:
    """An AutoencoderKL / VQModel training checkpoint: the loss (LPIPS, discriminator), VQModel's model_ema."""
    state = original_state(reference, keys)
    state.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
                  "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3)})
    if reference.regularizer == "vq":
        state.update({"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(3),
                      "model_ema.encoderconv_inweight": torch.randn(32, 3, 3, 3)})
    return {"state_dict": state, "optimizer_states": [], "global_step": 10}


def assert_identical(model: Autoencoder, reference: Autoencoder, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(model.encode(x).mean, reference.encode(x).mean)
        assert torch.equal(model.encode(x).std, reference.encode(x).std)
        z = reference.encode(x).mean
        assert torch.equal(model.decode(z), reference.decode(z))


@pytest.mark.parametrize("kind", ["full", "bare"])
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_an_original_checkpoint_loads_the_same(tmp_path, regularizer, kind):
    config, keys = ORIGINAL[regularizer]
    reference = tiny(config, seed=8)
    checkpoint = (full_ldm_checkpoint if kind == "full" else bare_autoencoder_checkpoint)(reference, keys)
    torch.save(checkpoint, tmp_path / "model.ckpt")

    assert pretrained_autoencoder_kind(tmp_path / "model.ckpt") == "original"
    model, scale = load_pretrained_autoencoder(tmp_path / "model.ckpt", config)
    assert scale == (pytest.approx(0.25) if kind == "full" else None)  # LatentDiffusion's scale_factor buffer
    assert_identical(model, reference, images(seed=9))


def test_an_original_safetensors_file_loads_with_attention_stored_as_matrices(tmp_path):
    reference = tiny(VQ_WITH_ATTENTION, seed=10)
    state = original_state(reference, ORIGINAL_VQ_KEYS)
    state["decoder.mid.attn_1.q.weight"] = state["decoder.mid.attn_1.q.weight"][:, :, 0, 0].contiguous()
    save_file(state, str(tmp_path / "vq.safetensors"))
    model, scale = load_pretrained_autoencoder(tmp_path / "vq.safetensors", VQ_WITH_ATTENTION)
    assert scale is None
    assert_identical(model, reference, images(seed=11))


def test_an_original_checkpoint_takes_a_preset_name(tmp_path):
    reference = tiny(SMALL_PRESETS["kl-f2-small"], seed=12)
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in reference.state_dict().items()}},
               tmp_path / "ldm.ckpt")
    model, _ = load_pretrained_autoencoder(tmp_path / "ldm.ckpt", "kl-f2-small")
    assert model.config == reference.config
    assert_identical(model, reference, images(size=32, seed=13))


# --------------------------------------------------------------------------- bad input
def test_unknown_layouts_are_one_line_naming_what_was_found(tmp_path):
    torch.save({"state_dict": {"backbone.layer1.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError) as error:
        load_pretrained_autoencoder(tmp_path / "other.ckpt", KL)
    assert_one_line(error, str(tmp_path / "other.ckpt"), "unknown layout", "backbone.layer1.weight",
                    "first_stage_model.*", "diffusers")
    assert pretrained_autoencoder_kind(tmp_path / "other.ckpt") is None

    save_file(diffusers_vq().state_dict(), str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_pretrained_autoencoder(tmp_path / "vae.safetensors", VQ)
    assert_one_line(error, "diffusers-layout weights without their config.json")

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as error:
        load_pretrained_autoencoder(tmp_path / "empty")
    assert_one_line(error, "not a diffusers model")

    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError) as error:
        load_pretrained_autoencoder(tmp_path / "notes.ckpt", KL)
    assert_one_line(error, str(tmp_path / "notes.ckpt"), "could not be read")


def test_missing_paths_and_missing_or_wrong_configs_are_one_line(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_pretrained_autoencoder(tmp_path / "nope.ckpt", KL)
    assert_one_line(error, "not found", str(tmp_path / "nope.ckpt"))

    reference = tiny(KL_WITH_ATTENTION)
    torch.save(full_ldm_checkpoint(reference, ORIGINAL_KL_KEYS), tmp_path / "ldm.ckpt")
    with pytest.raises(ConfigError) as error:
        load_pretrained_autoencoder(tmp_path / "ldm.ckpt")
    assert_one_line(error, "original CompVis checkpoint", "stores no architecture", "autoencoder.architecture", "kl-f8")
    with pytest.raises(ConfigError) as error:
        load_pretrained_autoencoder(tmp_path / "ldm.ckpt", dict(KL_WITH_ATTENTION, chanels=32))
    assert_one_line(error, "chanels")
    with pytest.raises(ConfigError) as error:
        load_pretrained_autoencoder(tmp_path / "ldm.ckpt", "kl-f3")
    assert_one_line(error, "unknown autoencoder preset 'kl-f3'")
    with pytest.raises(CheckpointError) as error:  # the architecture without the level-1 attention
        load_pretrained_autoencoder(tmp_path / "ldm.ckpt", KL)
    assert_one_line(error, str(tmp_path / "ldm.ckpt"), "unexpected", "decoder.up.1.attn.0")


def test_a_missing_key_is_named_in_one_line(tmp_path):
    checkpoint = bare_autoencoder_checkpoint(tiny(KL_WITH_ATTENTION), ORIGINAL_KL_KEYS)
    del checkpoint["state_dict"]["encoder.mid.attn_1.k.bias"]
    torch.save(checkpoint, tmp_path / "ae.ckpt")
    with pytest.raises(CheckpointError) as error:
        load_pretrained_autoencoder(tmp_path / "ae.ckpt", KL_WITH_ATTENTION)
    assert_one_line(error, str(tmp_path / "ae.ckpt"), "missing ['encoder.mid.attn_1.k.bias']")


# --------------------------------------------------------------------------- stage 2
def test_stage2_loads_a_diffusers_folder_with_its_scaling_factor(tmp_path):
    theirs = diffusers_kl([8], scaling_factor=0.4)
    theirs.save_pretrained(tmp_path / "sd" / "vae")
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    first_stage = load_first_stage(path=str(tmp_path / "sd"), regularizer="kl", downsampling_factor=2)
    assert isinstance(first_stage, FrozenFirstStage)
    assert float(first_stage.scale_factor) == pytest.approx(0.4)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert_close(first_stage.decode(z), theirs.decode(z / 0.4).sample)
        assert_close(first_stage.encode_mean(images()), theirs.encode(images()).latent_dist.mean * 0.4)
    assert load_first_stage(path=str(tmp_path / "sd"), scale_factor=1.5).scale_factor == 1.5  # a set scale wins

    with pytest.raises(CheckpointError) as error:
        load_first_stage(path=str(tmp_path / "sd"), regularizer="vq")
    assert_one_line(error, '"regularizer": "kl"', '{"regularizer": "vq"}')


def test_stage2_keeps_vq_latents_unscaled(tmp_path):
    # diffusers' LDMPipeline divides by VQModel.scaling_factor, a default (0.18215) the LDM VQ models never used
    diffusers_vq().save_pretrained(tmp_path / "vqvae")
    assert float(load_first_stage(path=str(tmp_path / "vqvae")).scale_factor) == 1.0


def test_stage2_loads_an_original_checkpoint_with_its_architecture(tmp_path):
    reference = tiny(KL_WITH_ATTENTION, seed=15)
    torch.save(bare_autoencoder_checkpoint(reference, ORIGINAL_KL_KEYS), tmp_path / "kl.ckpt")
    architecture = OmegaConf.create(KL_WITH_ATTENTION)  # as Hydra passes it
    first_stage = load_first_stage(path=str(tmp_path / "kl.ckpt"), architecture=architecture, scale_factor=0.5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        assert torch.equal(first_stage.decode(z), reference.decode(z / 0.5))
    assert first_stage.export_config == {"export": str(tmp_path / "kl.ckpt"), "config": reference.config}

    torch.save(full_ldm_checkpoint(reference, ORIGINAL_KL_KEYS), tmp_path / "ldm.ckpt")
    assert float(load_first_stage(path=str(tmp_path / "ldm.ckpt"), architecture=dict(KL_WITH_ATTENTION))
                 .scale_factor) == pytest.approx(0.25)  # LatentDiffusion's own scale_factor buffer

    with pytest.raises(ConfigError) as error:
        load_first_stage(path=str(tmp_path / "kl.ckpt"))
    assert_one_line(error, "autoencoder.architecture")


def test_stage2_still_reads_its_own_files_as_before(tmp_path):
    export = save_autoencoder_export(tiny(KL), tmp_path / "export" / "autoencoder.safetensors")
    stage2 = tmp_path / "stage2.ckpt"
    torch.save({"lightning_ldm": {}, "state_dict": {"first_stage.autoencoder.encoder.conv_in.weight": torch.zeros(1)}},
               stage2)
    assert pretrained_autoencoder_kind(export) is None and pretrained_autoencoder_kind(stage2) is None
    assert load_first_stage(path=str(export)).source == str(export)


def test_the_architecture_key_is_in_the_stage2_config(compose):
    validate_config(compose("stage=diffusion", "autoencoder=export", "autoencoder.architecture=kl-f8"))
    validate_config(compose("stage=diffusion", "autoencoder=export", "autoencoder.architecture={ch:32,z_channels:4}"))
    with pytest.raises(ConfigError, match=r"autoencoder\.architecture: expected"):
        validate_config(compose("stage=diffusion", "autoencoder=export", "autoencoder.architecture=3"))
