"""UNet weights in from the original CompVis latent-diffusion layout and from diffusers, and out to both.

Our ``UNet`` holds the layers of LDM's ``UNetModel`` (ldm/modules/diffusionmodules/openaimodel.py, with
ldm/modules/attention.py's SpatialTransformer) under other names, and attention under other shapes
(ours -> the original's, keys ``model.diffusion_model.*`` -> diffusers'):

- time_embed.linear_1 / 2 -> time_embed.0 / 2 -> time_embedding.linear_1 / 2
- conv_in -> input_blocks.0.0 -> conv_in
- input_blocks.{i}.{j} -> input_blocks.{i+1}.{j} -> down_blocks.{level}.resnets / attentions.{k}, downsamplers.0
- middle_block.0 / 1 / 2 -> middle_block.0 / 1 / 2 -> mid_block.resnets.0 / attentions.0 / resnets.1
- output_blocks.{i}.{j} -> output_blocks.{i}.{j} -> up_blocks.{u}.resnets / attentions.{k}, upsamplers.0
- out.0 / out.2 -> out.0 / out.2 -> conv_norm_out / conv_out
- ResBlock norm1, conv1, emb_proj, norm2, conv2, skip -> in_layers.0, in_layers.2, emb_layers.1, out_layers.0,
  out_layers.3, skip_connection -> norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
- Downsample / Upsample conv -> op / conv -> conv
- SelfAttention norm, qkv, proj_out (Linear) -> AttentionBlock norm, qkv, proj_out (Conv1d) -> Attention
  group_norm, to_q / to_k / to_v, to_out.0
- SpatialTransformer norm, proj_in, proj_out (Linear) -> the same names (1x1 Conv2d) -> Transformer2DModel's
  (1x1 Conv2d, or Linear with use_linear_projection)
- its blocks.{n}: self_attn.to_qkv, self_attn.to_out, cross_attn.to_q, cross_attn.to_kv, cross_attn.to_out,
  ff.proj_in, ff.proj_out, norm1..3 -> transformer_blocks.{n}: attn1.to_q / to_k / to_v, attn1.to_out.0,
  attn2.to_q, attn2.to_k / to_v, attn2.to_out.0, ff.net.0.proj, ff.net.2, norm1..3 -> as the original

Our fused qkv rows are (q, k, v) x heads x head width; the original AttentionBlock's (QKVAttentionLegacy) are
heads x (q, k, v) x head width. The class embedding added to the time embedding (ADM, LDM "adm") is the
conditioner's table here (``ClassEmbedder``, with a null row); the original keeps it as ``label_emb.weight``
(num_classes rows), diffusers as ``class_embedding.weight`` (num_class_embeds rows): it travels as ``class_table``.

GroupNorm eps: 1e-6 in the SpatialTransformer (the original's Normalize, diffusers' Transformer2DModel), 1e-5 in
every other UNet norm, in all three codebases.

diffusers is optional: it is imported inside the functions that need it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_ldm.extras import import_extra
from lightning_ldm.file_format import read_weights
from lightning_ldm.interop.architecture import Architecture, build
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.strict_loading import load_state_strictly
from lightning_ldm.unet.attention import SelfAttention, SpatialTransformer
from lightning_ldm.unet.blocks import Downsample, ResBlock, Upsample, group_norm
from lightning_ldm.unet.model import PRESETS, UNet

ORIGINAL_PREFIX = "model.diffusion_model."  # the UNet inside a LatentDiffusion checkpoint
ORIGINAL_CLASS_TABLE = "label_emb.weight"
DIFFUSERS_CLASS_TABLE = "class_embedding.weight"
DIFFUSERS_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GROUP_NORM_EPS = group_norm(32).eps
# Settings that shape no weight: an expected_config's own values are kept, not compared
TRAINING_SETTINGS = ("dropout", "use_checkpoint")

Layout = Literal["original", "diffusers"]
Tensors = tuple[Tensor, ...]

_RESBLOCK_NAMES: dict[Layout, dict[str, str]] = {
    "original": {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"},
    "diffusers": {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "skip": "conv_shortcut"},
}
_TRANSFORMER_BLOCK_NAMES = {  # ours -> BasicTransformerBlock's (the original's and diffusers')
    "norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "self_attn.to_out": "attn1.to_out.0",
    "cross_attn.to_q": "attn2.to_q", "cross_attn.to_out": "attn2.to_out.0", "ff.proj_in": "ff.net.0.proj",
    "ff.proj_out": "ff.net.2",
}
_TRANSFORMER_BLOCK_FUSED = {"self_attn.to_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
                            "cross_attn.to_kv": ("attn2.to_k", "attn2.to_v")}


# --------------------------------------------------------------------------- one tensor, two layouts
def _same(tensor: Tensor) -> Tensors:
    return (tensor,)


def _first(tensors: Tensors) -> Tensor:
    return tensors[0]


def _matrix(tensor: Tensor) -> Tensor:
    """A 1x1 convolution's weight (out, in, 1[, 1]) as a Linear weight (out, in); others as they are."""
    return tensor.flatten(1) if tensor.ndim > 2 else tensor


@dataclass(frozen=True)
class _Link:
    """One of our tensors and the tensor(s) it is in another layout: ``out`` splits / reshapes ours into theirs,
    ``into`` does the reverse."""

    ours: str
    theirs: tuple[str, ...]
    out: Callable[[Tensor], Tensors] = _same
    into: Callable[[Tensors], Tensor] = _first


def _renamed(ours: str, theirs: str) -> _Link:
    return _Link(ours, (theirs,))


def _as_kernel(ours: str, theirs: str, kernel_dims: int) -> _Link:
    """A Linear weight as a 1x1 Conv1d (kernel_dims=1) or Conv2d (2) weight; biases as they are."""
    if not ours.endswith(".weight") or kernel_dims == 0:
        return _renamed(ours, theirs)
    return _Link(ours, (theirs,), lambda t: (t.reshape(*t.shape, *(1,) * kernel_dims),),
                 lambda ts: _matrix(ts[0]))


def _split(ours: str, theirs: Sequence[str]) -> _Link:
    """A fused projection (rows: parts, then heads) as one projection per part."""
    return _Link(ours, tuple(theirs), lambda t: t.chunk(len(theirs), dim=0), lambda ts: torch.cat(ts, dim=0))


def _legacy_qkv(ours: str, theirs: str, heads: int) -> _Link:
    """Our qkv rows (q/k/v, heads, d) as QKVAttentionLegacy's (heads, q/k/v, d), in a Conv1d weight."""
    def out(tensor: Tensor) -> Tensors:
        rows = tensor.unflatten(0, (3, heads, -1)).transpose(0, 1).flatten(0, 2)
        return (rows[..., None] if rows.ndim == 2 else rows,)

    def into(tensors: Tensors) -> Tensor:
        return _matrix(tensors[0]).unflatten(0, (heads, 3, -1)).transpose(0, 1).flatten(0, 2)

    return _Link(ours, (theirs,), out, into)


# --------------------------------------------------------------------------- which layer is which
def _original_layer_names(unet: UNet) -> dict[str, str]:
    names = {"time_embed.linear_1": "time_embed.0", "time_embed.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "out.0": "out.0", "out.2": "out.2"}
    for i, stage in enumerate(unet.input_blocks):  # the original's input_blocks.0 is conv_in
        names.update({f"input_blocks.{i}.{j}": f"input_blocks.{i + 1}.{j}" for j in range(len(stage))})
    names.update({f"middle_block.{j}": f"middle_block.{j}" for j in range(len(unet.middle_block))})
    for i, stage in enumerate(unet.output_blocks):
        names.update({f"output_blocks.{i}.{j}": f"output_blocks.{i}.{j}" for j in range(len(stage))})
    return names


def _diffusers_stage_names(ours: str, stage: nn.Module, block: str, slot: int, sampler: str) -> dict[str, str]:
    names = {}
    for j, layer in enumerate(stage):
        if isinstance(layer, (SelfAttention, SpatialTransformer)):
            names[f"{ours}.{j}"] = f"{block}.attentions.{slot}"
        elif isinstance(layer, ResBlock) and layer.resample == "none":
            names[f"{ours}.{j}"] = f"{block}.resnets.{slot}"
        else:  # Downsample / Upsample, or a resampling ResBlock (resblock_updown)
            names[f"{ours}.{j}"] = f"{block}.{sampler}.0"
    return names


def _diffusers_layer_names(unet: UNet) -> dict[str, str]:
    names = {"time_embed.linear_1": "time_embedding.linear_1", "time_embed.linear_2": "time_embedding.linear_2",
             "conv_in": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
             "middle_block.2": "mid_block.resnets.1"}
    levels, per_level = len(unet.config["channel_mult"]), unet.config["num_res_blocks"]
    inputs = iter(enumerate(unet.input_blocks))
    for level in range(levels):
        for slot in range(per_level + (level < levels - 1)):  # the last slot of a level: its downsampler
            i, stage = next(inputs)
            names.update(_diffusers_stage_names(f"input_blocks.{i}", stage, f"down_blocks.{level}", slot,
                                                "downsamplers"))
    outputs = iter(enumerate(unet.output_blocks))
    for up in range(levels):  # diffusers' up_blocks start at the lowest resolution, as ours
        for slot in range(per_level + 1):
            i, stage = next(outputs)
            names.update(_diffusers_stage_names(f"output_blocks.{i}", stage, f"up_blocks.{up}", slot, "upsamplers"))
    return names


# --------------------------------------------------------------------------- links of every tensor
def _layer_link(layer: nn.Module, name: str, ours: str, theirs: str, layout: Layout,
                linear_projection: bool) -> _Link:
    """The link of tensor ``name`` of one of our layers at ``ours``, which is ``theirs`` in ``layout``."""
    if "." not in name:  # a plain Linear / Conv2d / GroupNorm: same tensor names
        return _renamed(f"{ours}.{name}", f"{theirs}.{name}")
    sub, param = name.rsplit(".", 1)
    mine = f"{ours}.{name}"
    if isinstance(layer, ResBlock):
        return _renamed(mine, f"{theirs}.{_RESBLOCK_NAMES[layout][sub]}.{param}")
    if isinstance(layer, Downsample):
        return _renamed(mine, f"{theirs}.{'op' if layout == 'original' else 'conv'}.{param}")
    if isinstance(layer, Upsample):
        return _renamed(mine, f"{theirs}.conv.{param}")
    if isinstance(layer, SelfAttention):
        return _self_attention_link(mine, sub, param, theirs, layout, layer.heads)
    if isinstance(layer, SpatialTransformer):
        conv_dims = 0 if layout == "diffusers" and linear_projection else 2
        return _transformer_link(mine, sub, param, theirs, conv_dims)
    raise AssertionError(f"no mapping for {type(layer).__name__} at {ours}")


def _self_attention_link(mine: str, sub: str, param: str, theirs: str, layout: Layout, heads: int) -> _Link:
    if layout == "original":  # AttentionBlock: Conv1d projections, legacy head order
        if sub == "qkv":
            return _legacy_qkv(mine, f"{theirs}.qkv.{param}", heads)
        return _as_kernel(mine, f"{theirs}.{sub}.{param}", 1 if sub == "proj_out" else 0)
    if sub == "qkv":  # diffusers' Attention
        return _split(mine, [f"{theirs}.{part}.{param}" for part in ("to_q", "to_k", "to_v")])
    return _renamed(mine, f"{theirs}.{'group_norm' if sub == 'norm' else 'to_out.0'}.{param}")


def _transformer_link(mine: str, sub: str, param: str, theirs: str, conv_dims: int) -> _Link:
    if sub in ("proj_in", "proj_out"):
        return _as_kernel(mine, f"{theirs}.{sub}.{param}", conv_dims)
    if sub == "norm":
        return _renamed(mine, f"{theirs}.norm.{param}")
    _, index, inner = sub.split(".", 2)  # blocks.{n}.{inner}
    block = f"{theirs}.transformer_blocks.{index}"
    if inner in _TRANSFORMER_BLOCK_FUSED:
        return _split(mine, [f"{block}.{part}.{param}" for part in _TRANSFORMER_BLOCK_FUSED[inner]])
    return _renamed(mine, f"{block}.{_TRANSFORMER_BLOCK_NAMES[inner]}.{param}")


def _links(unet: UNet, layout: Layout, linear_projection: bool = False) -> list[_Link]:
    names = _original_layer_names(unet) if layout == "original" else _diffusers_layer_names(unet)
    links = []
    for ours, theirs in names.items():
        layer = unet.get_submodule(ours)
        links.extend(_layer_link(layer, name, ours, theirs, layout, linear_projection) for name in layer.state_dict())
    unmapped = set(unet.state_dict()) - {link.ours for link in links}
    assert not unmapped, f"UNet tensors without a {layout} name: {sorted(unmapped)[:5]}"
    return links


def _to_layout(state: Mapping[str, Tensor], links: Sequence[_Link]) -> dict[str, Tensor]:
    converted = {}
    for link in links:
        for key, tensor in zip(link.theirs, link.out(state[link.ours])):
            converted[key] = tensor.contiguous()
    return converted


def _from_layout(state: Mapping[str, Tensor], links: Sequence[_Link]) -> dict[str, Tensor]:
    return {link.ours: link.into(tuple(state[key] for key in link.theirs)) for link in links}


def _listed(keys: Sequence[str], at_most: int = 4) -> str:
    shown = ", ".join(keys[:at_most])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > at_most else ''})"


def _check_tensors(state: Mapping[str, Any], expected: Mapping[str, Tensor], source: str) -> None:
    """One CheckpointError line naming missing, unknown or misshapen tensors of ``state``."""
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        found = [f"{kind} {_listed(keys)}" for kind, keys in (("missing", missing), ("unknown", unknown)) if keys]
        raise CheckpointError(f"{source}: weights do not match the UNet architecture: {', '.join(found)}")
    for key, tensor in expected.items():
        value = state[key]
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        if shape != tuple(tensor.shape):
            raise CheckpointError(f"{source}: {key} has shape {shape}, the UNet architecture expects "
                                  f"{tuple(tensor.shape)}")


def _load(unet: UNet, state: Mapping[str, Any], layout: Layout, source: str, linear_projection: bool = False) -> None:
    links = _links(unet, layout, linear_projection)
    _check_tensors(state, _to_layout(unet.state_dict(), links), source)
    load_state_strictly(unet, _from_layout(state, links), Path(source))


def _check_class_table(table: Any, unet: UNet, where: str, error: type[Exception]) -> None:
    dim = unet.embedding_dim
    if not isinstance(table, Tensor) or table.ndim != 2 or table.shape[1] != dim:
        shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise error(f"{where}: the class table has shape {shape}, expected (num_classes, {dim}): the UNet adds "
                    f"class embeddings of width 4 x model_channels = {dim} to its time embedding")


def build_unet(config: Architecture) -> UNet:
    return build(UNet, PRESETS, config, "UNet")


# --------------------------------------------------------------------------- the original layout
def unet_from_original(state: Mapping[str, Any], config: Architecture,
                       source: str = f"original UNet weights ({ORIGINAL_PREFIX}*)") -> tuple[UNet, Optional[Tensor]]:
    """Our UNet from an original LDM state dict, and its class table (``label_emb.weight``, num_classes rows, no
    null row: the caller adds one for ``ClassEmbedder``) or None.

    ``state``: a whole LatentDiffusion state (only ``model.diffusion_model.*`` is read: first_stage_model,
    cond_stage_model and model_ema are other models' or copies) or the UNet's alone, prefix stripped. ``config``:
    our UNet kwargs (or a PRESETS name), which original checkpoints do not carry. Loaded strictly: a missing,
    unknown or misshapen tensor is one CheckpointError line naming it.
    """
    unet = build_unet(config)
    if any(key.startswith(ORIGINAL_PREFIX) for key in state):
        state = {key[len(ORIGINAL_PREFIX):]: value for key, value in state.items() if key.startswith(ORIGINAL_PREFIX)}
    weights = dict(state)
    class_table = weights.pop(ORIGINAL_CLASS_TABLE, None)
    if class_table is not None:
        _check_class_table(class_table, unet, f"{source}: {ORIGINAL_CLASS_TABLE}", CheckpointError)
    _load(unet, weights, "original", source)
    return unet, class_table


def unet_to_original(unet: UNet, class_table: Optional[Tensor] = None,
                     prefix: str = ORIGINAL_PREFIX) -> dict[str, Tensor]:
    """Our UNet's weights in the original layout (keys ``model.diffusion_model.*``); ``class_table`` (rows of
    width 4 x model_channels) becomes ``label_emb.weight``."""
    state = _to_layout({key: value.detach() for key, value in unet.state_dict().items()}, _links(unet, "original"))
    if class_table is not None:
        _check_class_table(class_table, unet, "unet_to_original", ConfigError)
        state[ORIGINAL_CLASS_TABLE] = class_table.detach()
    return {f"{prefix}{key}": value for key, value in state.items()}


# --------------------------------------------------------------------------- our config <-> diffusers' config
def _attention_heads(config: Mapping[str, Any]) -> dict[int, int]:
    """Heads per attending width (the attending levels' and the middle block's), as our UNet sets them."""
    widths = [config["model_channels"] * m for m in config["channel_mult"]]
    attending = {w for level, w in enumerate(widths) if 2**level in config["attention_resolutions"]} | {widths[-1]}
    return {w: _heads(config, w) for w in sorted(attending)}


def _heads(config: Mapping[str, Any], width: int) -> int:
    if config["num_head_channels"] > 0:
        return max(width // config["num_head_channels"], 1)
    return max(config["num_heads"], 1)


def _full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet kwargs with their defaults filled in; unknown keys are one ConfigError line."""
    defaults = {name: p.default for name, p in inspect.signature(UNet.__init__).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown UNet config keys {unknown}; known: {', '.join(defaults)}")
    full = {**defaults, **config}
    full["channel_mult"] = [int(m) for m in full["channel_mult"]]
    full["attention_resolutions"] = [int(d) for d in full["attention_resolutions"]]
    return full


def unet_diffusers_config(config: Mapping[str, Any], num_class_embeds: Optional[int] = None
                          ) -> tuple[str, dict[str, Any]]:
    """The diffusers class name (UNet2DModel without cross-attention, UNet2DConditionModel with it) and its config
    for our UNet config; what diffusers cannot hold is one ConfigError line."""
    c = _full_config(config)
    if not c["conv_resample"]:
        raise ConfigError("unet.conv_resample=false (average-pooling / conv-free resampling) does not map to "
                          "diffusers, whose down and up blocks resample with a 3x3 conv")
    if c["resblock_updown"] and c["context_dim"] is not None:
        raise ConfigError("unet.resblock_updown=true with cross-attention does not map to diffusers: its "
                          "CrossAttnDownBlock2D / CrossAttnUpBlock2D resample with a conv only")
    levels = len(c["channel_mult"])
    widths = [c["model_channels"] * m for m in c["channel_mult"]]
    attends = [2**level in c["attention_resolutions"] for level in range(levels)]
    common = dict(
        in_channels=c["in_channels"] + c["concat_channels"], out_channels=c["out_channels"] or c["in_channels"],
        center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, block_out_channels=widths,
        layers_per_block=c["num_res_blocks"], downsample_padding=1, mid_block_scale_factor=1,
        dropout=float(c["dropout"]), act_fn="silu", norm_num_groups=32, norm_eps=GROUP_NORM_EPS,
        resnet_time_scale_shift="scale_shift" if c["use_scale_shift_norm"] else "default", class_embed_type=None,
        num_class_embeds=num_class_embeds, time_embedding_type="positional",
    )  # fmt: skip
    if c["context_dim"] is None:
        plain_down, plain_up = (("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if c["resblock_updown"]
                                else ("DownBlock2D", "UpBlock2D"))
        resample = "resnet" if c["resblock_updown"] else "conv"
        return "UNet2DModel", dict(
            common, down_block_types=[("AttnDownBlock2D" if a else plain_down) for a in attends],
            up_block_types=[("AttnUpBlock2D" if a else plain_up) for a in reversed(attends)],
            mid_block_type="UNetMidBlock2D", downsample_type=resample, upsample_type=resample,
            attention_head_dim=_unet2d_head_width(c), attn_norm_num_groups=32, add_attention=True,
        )  # fmt: skip
    return "UNet2DConditionModel", dict(
        common, down_block_types=[("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in attends],
        up_block_types=[("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attends)],
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=c["context_dim"],
        transformer_layers_per_block=c["transformer_depth"],
        attention_head_dim=[_heads(c, w) for w in widths],  # UNet2DConditionModel: heads per level, despite the name
        use_linear_projection=False, only_cross_attention=False, upcast_attention=False,
    )  # fmt: skip


def _unet2d_head_width(config: Mapping[str, Any]) -> Optional[int]:
    """UNet2DModel's one attention_head_dim (a head width; None: one head per layer) for every attending width."""
    heads = _attention_heads(config)
    head_widths = {w // h for w, h in heads.items()}
    if len(head_widths) == 1:
        return head_widths.pop()
    if all(h == 1 for h in heads.values()):
        return None
    raise ConfigError(f"attention of widths {sorted(heads)} with {sorted(set(heads.values()))} heads has head widths "
                      f"{sorted(head_widths)}; diffusers' UNet2DModel has one head width (attention_head_dim) for "
                      "all: set unet.num_head_channels instead of unet.num_heads")


def _refusal(class_name: str, what: str) -> ConfigError:
    return ConfigError(f"diffusers {class_name} with {what} does not map onto lightning_ldm's UNet")


def _uniform(class_name: str, config: Mapping[str, Any], key: str) -> Any:
    """A setting that diffusers allows per block and ours fixes for all: the one value."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(set(map(str, value))) != 1:
            raise _refusal(class_name, f"{key}={list(value)} (ours: one value for every level)")
        value = value[0]
    if isinstance(value, (list, tuple)):
        raise _refusal(class_name, f"{key}={config[key]} (ours: one int)")
    return value


_REQUIRED_COMMON: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"), "norm_num_groups": (32,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "time_embedding_type": ("positional",), "center_input_sample": (False,), "class_embed_type": (None,),
    "mid_block_scale_factor": (1,), "downsample_padding": (1,), "resnet_time_scale_shift": ("default", "scale_shift"),
}
# What is not listed maps or is checked below; upcast_attention only changes half-precision numerics: accepted.
_REQUIRED: dict[str, dict[str, tuple[Any, ...]]] = {
    "UNet2DModel": {**_REQUIRED_COMMON, "mid_block_type": ("UNetMidBlock2D",), "add_attention": (True,),
                    "downsample_type": ("conv", "resnet"), "upsample_type": ("conv", "resnet"),
                    "attn_norm_num_groups": (None, 32)},
    "UNet2DConditionModel": {
        **_REQUIRED_COMMON, "mid_block_type": ("UNetMidBlock2DCrossAttn",), "dual_cross_attention": (False,),
        "mid_block_only_cross_attention": (None, False), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
        "addition_embed_type": (None,), "time_cond_proj_dim": (None,), "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
        "class_embeddings_concat": (False,), "attention_type": ("default",), "cross_attention_norm": (None,),
        "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0), "num_attention_heads": (None,),
        "reverse_transformer_layers_per_block": (None,)},
}
_BLOCK_TYPES = {  # class -> (down block type -> (attends, resampling)), same for up
    "UNet2DModel": ({"DownBlock2D": (False, "conv"), "AttnDownBlock2D": (True, None),
                     "ResnetDownsampleBlock2D": (False, "resnet")},
                    {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, None),
                     "ResnetUpsampleBlock2D": (False, "resnet")}),
    "UNet2DConditionModel": ({"DownBlock2D": (False, "conv"), "CrossAttnDownBlock2D": (True, "conv")},
                             {"UpBlock2D": (False, "conv"), "CrossAttnUpBlock2D": (True, "conv")}),
}


def unet_config_from_diffusers(class_name: str, config: Mapping[str, Any], concat_channels: int = 0) -> dict[str, Any]:
    """Our UNet kwargs for a diffusers UNet2DModel / UNet2DConditionModel config (all keys present: see
    ``_with_defaults``); what our UNet cannot hold is one ConfigError line. ``concat_channels``: how many of
    diffusers' in_channels are our ``concat`` input (diffusers has no such notion)."""
    if class_name not in DIFFUSERS_CLASSES:
        raise ConfigError(f"diffusers {class_name} does not map onto lightning_ldm's UNet: only "
                          f"{' and '.join(DIFFUSERS_CLASSES)} do")
    for key, allowed in _REQUIRED[class_name].items():
        if config.get(key) not in allowed:
            raise _refusal(class_name, f"{key}={config.get(key)!r} (ours: {' or '.join(map(repr, allowed))})")
    if abs(float(config["norm_eps"]) - GROUP_NORM_EPS) > 1e-12:
        raise _refusal(class_name, f"norm_eps={config['norm_eps']} (ours: GroupNorm eps {GROUP_NORM_EPS})")
    if class_name == "UNet2DConditionModel" and any(_listify(config["only_cross_attention"], 1)):
        raise _refusal(class_name, "only_cross_attention (ours: self- then cross-attention in every block)")
    widths = [int(w) for w in config["block_out_channels"]]
    if any(w % widths[0] for w in widths):
        raise _refusal(class_name, f"block_out_channels={widths} (ours: multiples of the first)")
    embed_dim = config.get("time_embedding_dim")
    if embed_dim is not None and embed_dim != 4 * widths[0]:
        raise _refusal(class_name, f"time_embedding_dim={embed_dim} (ours: 4 x block_out_channels[0])")
    attends, resblock_updown = _attention_levels(class_name, config, len(widths))
    in_channels = int(config["in_channels"])
    if not 0 <= concat_channels < in_channels:
        raise ConfigError(f"concat_channels={concat_channels} must be >= 0 and below the diffusers UNet's "
                          f"in_channels={in_channels}")
    latent_channels = in_channels - concat_channels
    conditional = class_name == "UNet2DConditionModel"
    context_dim = int(_uniform(class_name, config, "cross_attention_dim")) if conditional else None
    return dict(
        in_channels=latent_channels,
        out_channels=None if int(config["out_channels"]) == latent_channels else int(config["out_channels"]),
        model_channels=widths[0], channel_mult=[w // widths[0] for w in widths],
        num_res_blocks=int(_uniform(class_name, config, "layers_per_block")),
        attention_resolutions=[2**level for level, a in enumerate(attends) if a],
        **_heads_from_diffusers(class_name, config, widths, attends), dropout=float(config["dropout"]),
        use_scale_shift_norm=config["resnet_time_scale_shift"] == "scale_shift", resblock_updown=resblock_updown,
        conv_resample=True, context_dim=context_dim,
        transformer_depth=int(_uniform(class_name, config, "transformer_layers_per_block")) if conditional else 1,
        concat_channels=concat_channels,
    )  # fmt: skip


def _listify(value: Any, length: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * length


def _attention_levels(class_name: str, config: Mapping[str, Any], levels: int) -> tuple[list[bool], bool]:
    """Which levels attend (ours: the same ones down and up) and whether ResBlocks resample (resblock_updown)."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    down_kinds, up_kinds = _BLOCK_TYPES[class_name]
    unknown = [t for t in down_types if t not in down_kinds] + [t for t in up_types if t not in up_kinds]
    if unknown or len(down_types) != levels or len(up_types) != levels:
        raise _refusal(class_name, f"down_block_types={down_types}, up_block_types={up_types} (ours: "
                                   f"{', '.join(down_kinds)}; {', '.join(up_kinds)}, one per block_out_channels)")
    attends = [down_kinds[t][0] for t in down_types]
    if attends != [up_kinds[t][0] for t in reversed(up_types)]:
        raise _refusal(class_name, f"down_block_types={down_types}, up_block_types={up_types} (ours attends at "
                                   "the same levels on the way down and up)")
    attention_resampling = {"down": config.get("downsample_type"), "up": config.get("upsample_type")}
    resampling = {(kinds[t][1] or attention_resampling[side])
                  for side, types, kinds in (("down", down_types, down_kinds), ("up", up_types, up_kinds))
                  for t in types[:-1]}  # the last down block and the last up block do not resample
    if len(resampling) > 1:
        raise _refusal(class_name, f"down_block_types={down_types}, up_block_types={up_types}, downsample_type="
                                   f"{config.get('downsample_type')!r}, upsample_type={config.get('upsample_type')!r} "
                                   "(ours resamples with convs everywhere or ResBlocks everywhere)")
    if class_name == "UNet2DModel" and config["attn_norm_num_groups"] is None and \
            config["resnet_time_scale_shift"] != "default":
        raise _refusal(class_name, "attn_norm_num_groups=None and scale_shift (a mid-block attention without "
                                   "GroupNorm; ours has one)")
    return attends, resampling == {"resnet"}


def _heads_from_diffusers(class_name: str, config: Mapping[str, Any], widths: list[int],
                          attends: list[bool]) -> dict[str, int]:
    """Our num_heads / num_head_channels from diffusers' attention_head_dim."""
    attending = [level for level, a in enumerate(attends) if a] + [len(widths) - 1]  # + the middle block
    value = config["attention_head_dim"]
    if class_name == "UNet2DModel":  # a head width for every layer; None: one head
        if value is None:
            return dict(num_heads=1, num_head_channels=-1)
        if any(widths[level] % int(value) for level in attending):
            raise _refusal(class_name, f"attention_head_dim={value} not dividing the attention widths "
                                       f"{sorted({widths[level] for level in attending})}")
        return dict(num_heads=-1, num_head_channels=int(value))
    heads = _listify(value, len(widths))  # UNet2DConditionModel: heads per level (diffusers' naming)
    pairs = {(widths[level], int(heads[level])) for level in attending if level < len(heads)}
    if len(heads) != len(widths) or any(h < 1 or w % h for w, h in pairs):
        raise _refusal(class_name, f"attention_head_dim={value} (heads per level) for widths {widths}")
    head_widths, counts = {w // h for w, h in pairs}, {h for _, h in pairs}
    if len(head_widths) == 1:
        return dict(num_heads=-1, num_head_channels=head_widths.pop())
    if len(counts) == 1:
        return dict(num_heads=counts.pop(), num_head_channels=-1)
    raise _refusal(class_name, f"attention_head_dim={value} (heads per level) for widths {widths}: neither one head "
                               "count nor one head width (ours: num_heads or num_head_channels)")


def architecture_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """What fixes the UNet's weights and outputs, whichever way the config spells it (heads as counts per
    attending width; out_channels resolved; no training settings)."""
    c = _full_config(config)
    summary = {key: value for key, value in c.items()
               if key not in (*TRAINING_SETTINGS, "num_heads", "num_head_channels")}
    summary["out_channels"] = c["out_channels"] or c["in_channels"]
    summary["attention_resolutions"] = sorted(set(c["attention_resolutions"]))
    summary["heads per attention width"] = _attention_heads(c)
    if c["context_dim"] is None:
        summary["transformer_depth"] = None  # unused without cross-attention
    return summary


def _check_expected(expected: Mapping[str, Any], found: Mapping[str, Any], source: str) -> None:
    wanted, got = architecture_summary(expected), architecture_summary(found)
    differences = [f"{key} {wanted[key]} vs {got[key]}" for key in wanted if wanted[key] != got[key]]
    if differences:
        raise CheckpointError(f"{source}: the diffusers UNet's architecture differs from the expected config "
                              f"(expected vs found: {'; '.join(differences)})")


# --------------------------------------------------------------------------- diffusers


def unet_to_diffusers(unet: UNet, class_table: Optional[Tensor] = None) -> nn.Module:
    """The equivalent diffusers UNet (see ``unet_diffusers_config``) on the UNet's device and dtype, in its mode.

    ``class_table``: the class embedding added to the time embedding (a ClassEmbedder's table, null row
    included), which becomes diffusers' ``class_embedding`` (num_class_embeds = its rows): diffusers then takes
    ``class_labels`` where ours takes ``vector=table[labels]``. Our ``concat`` channels come after the latents in
    diffusers' in_channels.
    """
    diffusers = import_extra("diffusers")
    if class_table is not None:
        _check_class_table(class_table, unet, "unet_to_diffusers", ConfigError)
    class_name, config = unet_diffusers_config(unet.config, None if class_table is None else class_table.shape[0])
    model = getattr(diffusers, class_name)(**config)
    state = _to_layout({key: value.detach() for key, value in unet.state_dict().items()}, _links(unet, "diffusers"))
    if class_table is not None:
        state[DIFFUSERS_CLASS_TABLE] = class_table.detach()
    load_state_strictly(model, state, Path(f"diffusers {class_name}"))
    reference = next(unet.parameters())
    model.to(reference.device).train(unet.training)
    return model if reference.dtype == torch.float32 else model.to(reference.dtype)


def unet_from_diffusers(source: Union[str, Path, nn.Module], *, concat_channels: Optional[int] = None,
                        expected_config: Optional[Mapping[str, Any]] = None) -> tuple[UNet, Optional[Tensor]]:
    """Our UNet from a diffusers UNet2DModel / UNet2DConditionModel, and its class table (``class_embedding``,
    num_class_embeds rows) or None.

    ``source``: the model, its folder (config.json + diffusion_pytorch_model.safetensors / .bin, sharded or not) or
    a pipeline folder with ``unet/``. ``concat_channels``: how many of diffusers' in_channels are our ``concat``
    input (default: expected_config's, else 0). ``expected_config``: our UNet kwargs the model must match (else one
    CheckpointError line naming the differing keys); the UNet is then built from it, so its dropout and
    use_checkpoint apply.
    """
    diffusers = import_extra("diffusers")
    class_name, config, state, label = _read_diffusers(source, diffusers)
    if concat_channels is None:
        concat_channels = int((expected_config or {}).get("concat_channels", 0))
    ours = unet_config_from_diffusers(class_name, config, concat_channels)
    if expected_config is not None:
        _check_expected(expected_config, ours, label)
        ours = dict(expected_config)
    unet = build_unet(ours)
    weights = dict(state)
    class_table = weights.pop(DIFFUSERS_CLASS_TABLE, None) if config.get("num_class_embeds") is not None else None
    if class_table is not None:
        _check_class_table(class_table, unet, f"{label}: {DIFFUSERS_CLASS_TABLE}", CheckpointError)
    _load(unet, weights, "diffusers", label, linear_projection=bool(config.get("use_linear_projection", False)))
    return unet, class_table


def _read_diffusers(source: Any, diffusers: Any) -> tuple[str, dict[str, Any], Mapping[str, Tensor], str]:
    """(class name, full config, state dict, a label for messages) of a diffusers UNet or its folder."""
    if isinstance(source, (str, Path)):
        folder = _model_folder(Path(source).expanduser())
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{folder}/config.json could not be read ({type(error).__name__})") from None
        class_name = raw.get("_class_name") if isinstance(raw, dict) else None
        if class_name not in DIFFUSERS_CLASSES:
            raise CheckpointError(f"{folder} holds a diffusers {class_name}, not a "
                                  f"{' or '.join(DIFFUSERS_CLASSES)}")
        return class_name, _with_defaults(getattr(diffusers, class_name), raw), _read_weights(folder), str(folder)
    class_name = type(source).__name__
    if class_name not in DIFFUSERS_CLASSES or not isinstance(source, nn.Module):
        raise ConfigError(f"unet_from_diffusers takes a diffusers {' or '.join(DIFFUSERS_CLASSES)} or its folder, "
                          f"not a {class_name}")
    return class_name, dict(source.config), source.state_dict(), f"diffusers {class_name}"


def _with_defaults(model_class: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json's settings over the class's defaults (older files lack newer settings)."""
    defaults = {name: p.default for name, p in inspect.signature(model_class.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **{key: value for key, value in config.items() if not key.startswith("_")}}


def _model_folder(source: Path) -> Path:
    for folder in (source, source / "unet"):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(f"{source} is not a diffusers UNet folder (config.json + weights) nor a pipeline folder "
                          "with unet/")


def _read_weights(folder: Path) -> dict[str, Tensor]:
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return read_weights(folder / name)
    for name in DIFFUSERS_WEIGHT_FILES:  # sharded: an index names each tensor's file
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {key: value for shard in shards for key, value in read_weights(folder / shard).items()}
    raise CheckpointError(f"{folder}: no diffusers weights ({' or '.join(DIFFUSERS_WEIGHT_FILES)}, or a sharded "
                          "index of them)")
