"""The UNet in from the original CompVis layout and diffusers, and out to both: same weights, same outputs (every
parameter random, so each one counts), the original key names as openaimodel.py spells them, one-line errors."""

import json
import math
import sys
from collections.abc import Callable
from typing import Any, Optional

import pytest
import torch
from torch import Tensor, nn

from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.interop.unet import (ORIGINAL_PREFIX, architecture_summary, unet_diffusers_config,
                                        unet_from_diffusers, unet_from_original, unet_to_diffusers, unet_to_original)
from lightning_ldm.unet.model import PRESETS, UNet

TOLERANCE = 1e-4  # float32 rounding: measured differences are 1e-7 to 1e-5
CONTEXT_DIM, CONTEXT_LENGTH, NUM_CLASSES = 16, 5, 5

TINY = dict(in_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
            num_head_channels=32)  # level 1 and the middle: width 64, 2 heads
CROSS = dict(TINY, attention_resolutions=[1, 2], num_head_channels=-1, num_heads=2, context_dim=CONTEXT_DIM)
CASES: dict[str, tuple[dict[str, Any], bool]] = {  # name: (our config, with a class table)
    "self_attention": (TINY, False),
    "num_heads": (dict(TINY, num_head_channels=-1, num_heads=4), False),  # 4 heads of 16 at width 64
    "head_channels_16": (dict(TINY, attention_resolutions=[1, 2], num_head_channels=16), False),  # 2 and 4 heads
    "class_adm": (TINY, True),
    "scale_shift": (dict(TINY, use_scale_shift_norm=True), False),
    "resblock_updown": (dict(TINY, resblock_updown=True, use_scale_shift_norm=True, out_channels=8), False),
    "concat": (dict(TINY, concat_channels=2), False),
    "three_levels": (dict(TINY, channel_mult=[1, 1, 2], num_res_blocks=2, attention_resolutions=[2, 4]), False),
    "cross_attention": (CROSS, False),
    "cross_attention_class": (CROSS, True),
    "cross_head_channels": (dict(CROSS, num_heads=-1, num_head_channels=16, attention_resolutions=[2]), False),
    "cross_depth_2": (dict(CROSS, transformer_depth=2), False),
    "cross_scale_shift_concat": (dict(CROSS, use_scale_shift_norm=True, concat_channels=3), False),
}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (zero-initialised output convs included), activations kept of order one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1:
                is_scale = "norm" in name and name.endswith("weight")
                parameter.copy_(0.2 * noise + (1.0 if is_scale else 0.0))
            else:
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
    return model.eval()


def our_unet(config: dict[str, Any], seed: int = 0) -> UNet:
    return randomised(UNet(**config), seed)


def class_table(unet: UNet, with_classes: bool) -> Optional[Tensor]:
    return torch.randn(NUM_CLASSES + 1, unet.embedding_dim) if with_classes else None  # + ClassEmbedder's null row


def inputs(unet: UNet, seed: int = 1) -> dict[str, Any]:
    """A batch of 2 for our UNet: x, t, and the context / concat / labels it takes."""
    generator = torch.Generator().manual_seed(seed)
    concat = unet.concat_channels
    return dict(
        x=torch.randn(2, unet.in_channels, 8, 8, generator=generator), t=torch.tensor([3, 731]),
        labels=torch.tensor([1, NUM_CLASSES]),  # a class and the null class
        context=(torch.randn(2, CONTEXT_LENGTH, CONTEXT_DIM, generator=generator)
                 if unet.context_dim is not None else None),
        concat=torch.randn(2, concat, 8, 8, generator=generator) if concat else None,
    )  # fmt: skip


def ours_output(unet: UNet, batch: dict[str, Any], table: Optional[Tensor]) -> Tensor:
    with torch.no_grad():
        vector = None if table is None else table[batch["labels"]]
        return unet(batch["x"], batch["t"], vector=vector, context=batch["context"], concat=batch["concat"])


def diffusers_output(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    x = batch["x"] if batch["concat"] is None else torch.cat([batch["x"], batch["concat"]], dim=1)
    kwargs: dict[str, Any] = {}
    if model.config.get("num_class_embeds") is not None:
        kwargs["class_labels"] = batch["labels"]
    if batch["context"] is not None:
        kwargs["encoder_hidden_states"] = batch["context"]
    with torch.no_grad():
        return model(x, batch["t"], **kwargs).sample


def max_difference(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    differing = [key for key in state_a if not torch.equal(state_a[key], state_b[key])]
    assert not differing, f"weights differ: {differing[:5]}"


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


# --------------------------------------------------------------------------- ours -> diffusers
@pytest.mark.parametrize("case", CASES)
def test_to_diffusers_gives_the_same_output(case: str) -> None:
    config, with_classes = CASES[case]
    unet = our_unet(config)
    table = class_table(unet, with_classes)
    model = unet_to_diffusers(unet, table)
    expected_class = "UNet2DConditionModel" if config.get("context_dim") else "UNet2DModel"
    assert type(model).__name__ == expected_class
    assert model.config.num_class_embeds == (None if table is None else NUM_CLASSES + 1)
    batch = inputs(unet)
    ours, theirs = ours_output(unet, batch, table), diffusers_output(model, batch)
    assert ours.abs().mean() > 0.05, "a trivial output would hide mapping errors"
    difference = max_difference(ours, theirs)
    assert difference < TOLERANCE, f"{case}: max |ours - diffusers| = {difference:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_diffusers_round_trip_keeps_weights_and_config(case: str) -> None:
    config, with_classes = CASES[case]
    unet = our_unet(config)
    table = class_table(unet, with_classes)
    model = unet_to_diffusers(unet, table)
    back, back_table = unet_from_diffusers(model, concat_channels=unet.concat_channels)
    assert architecture_summary(back.config) == architecture_summary(unet.config)
    assert_same_weights(unet, back)
    assert (back_table is None) == (table is None) and (table is None or torch.equal(back_table, table))
    # with expected_config, the UNet is built from it: the same config, spelled the same way
    rebuilt, _ = unet_from_diffusers(model, expected_config=dict(unet.config, use_checkpoint=True))
    assert rebuilt.config == dict(unet.config, use_checkpoint=True)
    assert_same_weights(unet, rebuilt)


def test_attention_head_settings_of_diffusers() -> None:
    """UNet2DModel's attention_head_dim is a head width; UNet2DConditionModel's is heads per level."""
    assert unet_diffusers_config(TINY)[1]["attention_head_dim"] == 32
    assert unet_diffusers_config(dict(TINY, num_head_channels=-1, num_heads=1))[1]["attention_head_dim"] == 64
    _, conditional = unet_diffusers_config(dict(CROSS, num_heads=-1, num_head_channels=16))
    assert conditional["attention_head_dim"] == [2, 4]
    assert unet_diffusers_config(CROSS)[1]["attention_head_dim"] == [2, 2]


# --------------------------------------------------------------------------- diffusers -> ours
DIFFUSERS_UNETS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet2d_class": ("UNet2DModel", dict(
        in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, num_class_embeds=3)),
    "unet2d_resnet_resampling": ("UNet2DModel", dict(
        in_channels=3, out_channels=6, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"), downsample_type="resnet",
        upsample_type="resnet", resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32,
        attention_head_dim=None)),
    "conditional": ("UNet2DConditionModel", dict(
        in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=(2, 4))),  # heads per level: head width 16
    "conditional_linear_class_depth_2": ("UNet2DConditionModel", dict(
        in_channels=6, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=2, use_linear_projection=True, transformer_layers_per_block=2, num_class_embeds=3,
        resnet_time_scale_shift="scale_shift")),
}


def diffusers_unet(class_name: str, config: dict[str, Any], seed: int = 2) -> nn.Module:
    import diffusers

    return randomised(getattr(diffusers, class_name)(**config), seed)


@pytest.mark.parametrize("case", DIFFUSERS_UNETS)
def test_from_a_diffusers_folder_gives_the_same_output(case: str, tmp_path) -> None:
    pytest.importorskip("diffusers")
    class_name, config = DIFFUSERS_UNETS[case]
    model = diffusers_unet(class_name, config)
    folder = tmp_path / "pipeline" / "unet" if case == "conditional" else tmp_path / "unet"  # a pipeline's unet/
    model.save_pretrained(folder)
    concat = 2 if case == "conditional_linear_class_depth_2" else 0  # diffusers' in_channels 6 = 4 latent + 2
    unet, table = unet_from_diffusers(tmp_path / "pipeline" if case == "conditional" else folder,
                                      concat_channels=concat)
    assert (table is None) == (config.get("num_class_embeds") is None)
    assert unet.concat_channels == concat and unet.in_channels == config["in_channels"] - concat
    batch = inputs(unet.eval())
    batch["labels"] = torch.tensor([0, 2])
    ours, theirs = ours_output(unet, batch, table), diffusers_output(model, batch)
    assert ours.abs().mean() > 0.05, "a trivial output would hide mapping errors"
    difference = max_difference(ours, theirs)
    assert difference < TOLERANCE, f"{case}: max |ours - diffusers| = {difference:.3g}"


def test_expected_config_must_match_the_folder(tmp_path) -> None:
    pytest.importorskip("diffusers")
    class_name, config = DIFFUSERS_UNETS["conditional"]
    diffusers_unet(class_name, config).save_pretrained(tmp_path)
    same = dict(in_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
                num_head_channels=16, context_dim=CONTEXT_DIM, dropout=0.1)
    unet, _ = unet_from_diffusers(tmp_path, expected_config=same)
    assert unet.config["dropout"] == 0.1  # the expected config's own training settings
    other = dict(same, channel_mult=[1, 2, 2], context_dim=32)
    with pytest.raises(CheckpointError) as error:
        unet_from_diffusers(tmp_path, expected_config=other)
    assert_one_line(error, "channel_mult", "context_dim", str(tmp_path))


# --------------------------------------------------------------------------- the original layout
@pytest.mark.parametrize("case", CASES)
def test_original_round_trip_is_exact(case: str) -> None:
    config, with_classes = CASES[case]
    unet = our_unet(config)
    table = class_table(unet, with_classes)
    state = unet_to_original(unet, table)
    assert all(key.startswith(ORIGINAL_PREFIX) for key in state)
    full_checkpoint = {**state, "first_stage_model.decoder.conv_in.weight": torch.zeros(1), "scale_factor": 1.0}
    back, back_table = unet_from_original(full_checkpoint, config)  # the other models' keys are not the UNet's
    assert_same_weights(unet, back)
    assert (back_table is None) == (table is None) and (table is None or torch.equal(back_table, table))
    batch = inputs(unet)
    difference = max_difference(ours_output(unet, batch, table), ours_output(back.eval(), batch, back_table))
    assert difference == 0.0, f"{case}: max difference {difference}"
    stripped = {key[len(ORIGINAL_PREFIX):]: value for key, value in state.items()}
    assert_same_weights(unet, unet_from_original(stripped, config)[0])


def _original_resblock(prefix: str, skip: bool = False) -> list[str]:
    layers = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    return [f"{prefix}.{layer}.{p}" for layer in layers + ["skip_connection"] * skip for p in ("weight", "bias")]


def _original_attention_block(prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{p}" for layer in ("norm", "qkv", "proj_out") for p in ("weight", "bias")]


def _original_spatial_transformer(prefix: str) -> list[str]:
    block = f"{prefix}.transformer_blocks.0"
    return ([f"{prefix}.{layer}.{p}" for layer in ("norm", "proj_in", "proj_out") for p in ("weight", "bias")]
            + [f"{block}.{attn}.{proj}.weight" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")]
            + [f"{block}.{layer}.{p}" for layer in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                                                    "norm1", "norm2", "norm3") for p in ("weight", "bias")])


def _original_keys(attention: Callable[[str], list[str]]) -> set[str]:
    """openaimodel.UNetModel's keys for TINY: in_channels 4, model_channels 32, channel_mult [1, 2],
    num_res_blocks 1, attention at ds 2 (written out from the original code, not from our mapping)."""
    keys = ["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias",
            "input_blocks.0.0.weight", "input_blocks.0.0.bias",
            *_original_resblock("input_blocks.1.0"),
            "input_blocks.2.0.op.weight", "input_blocks.2.0.op.bias",
            *_original_resblock("input_blocks.3.0", skip=True), *attention("input_blocks.3.1"),
            *_original_resblock("middle_block.0"), *attention("middle_block.1"), *_original_resblock("middle_block.2"),
            *_original_resblock("output_blocks.0.0", skip=True), *attention("output_blocks.0.1"),
            *_original_resblock("output_blocks.1.0", skip=True), *attention("output_blocks.1.1"),
            "output_blocks.1.2.conv.weight", "output_blocks.1.2.conv.bias",
            *_original_resblock("output_blocks.2.0", skip=True), *_original_resblock("output_blocks.3.0", skip=True),
            "out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"]
    return {ORIGINAL_PREFIX + key for key in keys}


def test_original_key_names_with_self_attention() -> None:
    state = unet_to_original(our_unet(TINY), torch.zeros(3, 128))
    assert set(state) == _original_keys(_original_attention_block) | {ORIGINAL_PREFIX + "label_emb.weight"}
    # AttentionBlock's projections are Conv1d: (3C, C, 1) and (C, C, 1)
    assert state[ORIGINAL_PREFIX + "middle_block.1.qkv.weight"].shape == (192, 64, 1)
    assert state[ORIGINAL_PREFIX + "middle_block.1.proj_out.weight"].shape == (64, 64, 1)


def test_original_key_names_with_spatial_transformers() -> None:
    state = unet_to_original(our_unet(dict(TINY, context_dim=CONTEXT_DIM)))
    assert set(state) == _original_keys(_original_spatial_transformer)
    # SpatialTransformer's proj_in / proj_out are 1x1 Conv2d; attn2 reads the context
    assert state[ORIGINAL_PREFIX + "middle_block.1.proj_in.weight"].shape == (64, 64, 1, 1)
    assert state[ORIGINAL_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (64, CONTEXT_DIM)


def test_legacy_head_order_of_the_original_qkv() -> None:
    """QKVAttentionLegacy reads qkv rows as heads x (q, k, v) x head width; ours are (q, k, v) x heads x width."""
    unet = our_unet(TINY)  # middle attention: 2 heads of 32
    qkv = unet_to_original(unet)[ORIGINAL_PREFIX + "middle_block.1.qkv.weight"][..., 0]
    ours = unet.middle_block[1].qkv.weight.detach()
    assert torch.equal(qkv[32:64], ours[64:96])  # head 0's k: ours after all of q
    assert torch.equal(qkv[96:128], ours[32:64])  # head 1's q


def test_the_original_layout_is_what_diffusers_converts() -> None:
    """diffusers' own converter of LDM checkpoints (convert_ldm_unet_checkpoint) reads our original-layout state into
    the model that unet_to_diffusers builds, with the same output."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config, _ = CASES["cross_depth_2"]
    unet = our_unet(config)
    table = class_table(unet, True)[:-1]  # label_emb: num_classes rows
    model = unet_to_diffusers(unet, table)
    converted = convert_ldm_unet_checkpoint(unet_to_original(unet, table), dict(model.config))
    target = randomised(type(model)(**model.config), seed=5)
    target.load_state_dict(converted, strict=True)
    batch = inputs(unet)
    batch["labels"] = torch.tensor([0, NUM_CLASSES - 1])
    difference = max_difference(ours_output(unet, batch, table), diffusers_output(target, batch))
    assert difference < TOLERANCE, f"max |ours - diffusers-converted original| = {difference:.3g}"


# --------------------------------------------------------------------------- bad input
def test_unknown_missing_and_misshapen_original_keys() -> None:
    unet = our_unet(TINY)
    state = unet_to_original(unet)
    del state[ORIGINAL_PREFIX + "middle_block.2.out_layers.3.bias"]
    state[ORIGINAL_PREFIX + "input_blocks.9.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        unet_from_original(state, TINY)
    assert_one_line(error, "middle_block.2.out_layers.3.bias", "input_blocks.9.0.weight")

    state = unet_to_original(unet)
    state[ORIGINAL_PREFIX + "middle_block.1.qkv.weight"] = torch.zeros(192, 64)  # a Linear's, not a Conv1d's
    with pytest.raises(CheckpointError) as error:
        unet_from_original(state, TINY)
    assert_one_line(error, "middle_block.1.qkv.weight", "(192, 64)", "(192, 64, 1)")

    state = unet_to_original(unet)
    state[ORIGINAL_PREFIX + "label_emb.weight"] = torch.zeros(10, 64)
    with pytest.raises(CheckpointError) as error:
        unet_from_original(state, TINY)
    assert_one_line(error, "label_emb.weight", "(10, 64)", "128")

    with pytest.raises(CheckpointError) as error:  # the architecture differs from the weights'
        unet_from_original(unet_to_original(unet), dict(TINY, num_res_blocks=2))
    assert_one_line(error, "missing", "unknown", "input_blocks.2.0.op.weight")


@pytest.mark.parametrize("config, fragment", [
    (dict(TINY, conv_resample=False), "conv_resample"),
    (dict(CROSS, resblock_updown=True), "resblock_updown"),
    (dict(TINY, num_head_channels=-1, num_heads=2, attention_resolutions=[1, 2]), "num_head_channels"),
])  # fmt: skip
def test_what_diffusers_cannot_hold_is_refused(config: dict[str, Any], fragment: str) -> None:
    pytest.importorskip("diffusers")
    with pytest.raises(ConfigError) as error:
        unet_to_diffusers(UNet(**config))
    assert_one_line(error, fragment)


BASE_CONDITIONAL = DIFFUSERS_UNETS["conditional"][1]


@pytest.mark.parametrize("change, fragment", [
    (dict(act_fn="mish"), "act_fn"),
    (dict(norm_num_groups=16), "norm_num_groups"),
    (dict(norm_eps=1e-6), "norm_eps"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(time_cond_proj_dim=8), "time_cond_proj_dim"),
    (dict(up_block_types=("UpBlock2D", "UpBlock2D")), "same levels"),  # attends down, not up
    (dict(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
          attention_head_dim=(2, 1)), "attention_head_dim"),  # head widths 16 and 64, 2 and 1 heads
    (dict(block_out_channels=(64, 96)), "block_out_channels"),  # 96 is no multiple of 64
])  # fmt: skip
def test_what_ours_cannot_hold_is_refused(change: dict[str, Any], fragment: str) -> None:
    pytest.importorskip("diffusers")
    model = diffusers_unet("UNet2DConditionModel", {**BASE_CONDITIONAL, **change})
    with pytest.raises(ConfigError) as error:
        unet_from_diffusers(model)
    assert_one_line(error, fragment)


def test_folders_that_hold_no_diffusers_unet(tmp_path) -> None:
    pytest.importorskip("diffusers")
    with pytest.raises(CheckpointError) as error:
        unet_from_diffusers(tmp_path)
    assert_one_line(error, str(tmp_path), "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30"}))
    with pytest.raises(CheckpointError) as error:
        unet_from_diffusers(tmp_path)
    assert_one_line(error, "AutoencoderKL")
    with pytest.raises(ConfigError) as error:
        unet_from_diffusers(nn.Linear(2, 2))
    assert_one_line(error, "Linear")


def test_diffusers_weights_must_fit_its_config(tmp_path) -> None:
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file, save_file

    class_name, config = DIFFUSERS_UNETS["unet2d_class"]
    diffusers_unet(class_name, config).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    weights["mid_block.attentions.0.to_k.weight"] = weights.pop("mid_block.attentions.0.to_q.weight")[:, :32]
    weights.pop("mid_block.attentions.0.to_k.weight")
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        unet_from_diffusers(tmp_path)
    assert_one_line(error, "mid_block.attentions.0.to_q.weight", "extra.weight")


def test_without_diffusers_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ConfigError) as error:
        unet_to_diffusers(UNet(**TINY))
    assert_one_line(error, 'pip install "lightning_ldm[diffusers]"')
    with pytest.raises(ConfigError):
        unet_from_diffusers("anywhere")


def test_which_presets_map_to_diffusers() -> None:
    """Config only (no model built): every preset maps, except LSUN-churches' 8 heads over widths 192..768, which
    UNet2DModel's single head width cannot hold."""
    for name, config in PRESETS.items():
        if name == "lsun_churches-ldm-kl-8":
            with pytest.raises(ConfigError, match="num_head_channels"):
                unet_diffusers_config(config)
        else:
            class_name, _ = unet_diffusers_config(config)
            assert class_name == ("UNet2DConditionModel" if config.get("context_dim") else "UNet2DModel")
