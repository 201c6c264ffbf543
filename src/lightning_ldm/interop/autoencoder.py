"""Stage-1 autoencoder weights in from the original CompVis latent-diffusion checkpoints and diffusers, and out to
diffusers.

Our ``Autoencoder`` keeps the original layout key for key (``ldm/modules/diffusionmodules/model.py`` Encoder and
Decoder, ``ldm/models/autoencoder.py`` AutoencoderKL and VQModel): ``encoder.down.{i}.block.{j}.norm1``,
``encoder.mid.attn_1.q`` as a 1x1 conv, ``quant_conv``, ``post_quant_conv``, ``quantize.embedding.weight``. Original
weights therefore load as they are, once what is not the autoencoder is dropped. diffusers' ``AutoencoderKL`` and
``VQModel`` hold the same layers under other names (``down_blocks.{i}.resnets.{j}``, attention projections as
Linear layers, decoder levels in reverse order): ``diffusers_key`` maps one name onto the other.

diffusers is optional: it is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_ldm.autoencoder.export import EXPORT_FORMAT, load_autoencoder_export
from lightning_ldm.autoencoder.model import PAPER_PRESETS, SMALL_PRESETS, Autoencoder
from lightning_ldm.extras import import_extra
from lightning_ldm.file_format import read_weights, safetensors_metadata
from lightning_ldm.interop.architecture import Architecture, build
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.strict_loading import load_state_strictly

LDM_PREFIX = "first_stage_model."  # the autoencoder inside a full LatentDiffusion checkpoint
# Original AutoencoderKL / VQModel state that is not the autoencoder: the loss (LPIPS, discriminator), VQModel's
# LitEma copy (use_ema), the segmentation colouriser and the quantiser's remap buffer (only remaps indices).
TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")
TRAINING_ONLY_KEYS = ("colorize", "quantize.used")
DIFFUSERS_CLASSES = ("AutoencoderKL", "VQModel")
DIFFUSERS_SUBFOLDERS = ("vae", "vqvae")  # a pipeline's autoencoder: Stable Diffusion's vae/, LDMPipeline's vqvae/
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
PRESETS = {**PAPER_PRESETS, **SMALL_PRESETS}

# Our (original) sublayer names -> diffusers' ResnetBlock2D / Attention names
_RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"}
_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_PROJECTION = re.compile(r".*\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight")



# --------------------------------------------------------------------------- the original layout
def autoencoder_from_original(state: Mapping[str, torch.Tensor], config: Architecture,
                              source: Union[str, Path] = "original state dict") -> Autoencoder:
    """An Autoencoder from an original state dict: a bare AutoencoderKL / VQModel checkpoint's, or a full
    LatentDiffusion checkpoint's (only its ``first_stage_model.*`` is kept). ``config``: our Autoencoder kwargs
    (or a preset name), which original checkpoints do not carry."""
    model = build_autoencoder(config)
    load_state_strictly(model, original_autoencoder_state(state), Path(source))
    return model


def original_autoencoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's weights, in our keys, from an original AutoencoderKL / VQModel / LatentDiffusion state."""
    if any(key.startswith(LDM_PREFIX) for key in state):
        state = {key[len(LDM_PREFIX):]: value for key, value in state.items() if key.startswith(LDM_PREFIX)}
    kept = {key: value for key, value in state.items()
            if not key.startswith(TRAINING_ONLY_PREFIXES) and key not in TRAINING_ONLY_KEYS}
    return {key: _as_conv_weight(key, value) for key, value in kept.items()}


def is_original_layout(keys: Iterable[str]) -> bool:
    """Keys of an original LatentDiffusion (first_stage_model.*) or AutoencoderKL / VQModel (encoder.down.*) state."""
    return any(isinstance(key, str) and key.startswith((LDM_PREFIX, "encoder.down.")) for key in keys)


def original_scale_factor(state: Mapping[str, Any]) -> Optional[float]:
    """LatentDiffusion's ``scale_factor`` buffer (present when it was trained with ``scale_by_std``), else None."""
    value = state.get("scale_factor")
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


# --------------------------------------------------------------------------- diffusers
def diffusers_key(key: str, num_levels: int) -> str:
    """Our (= the original) state-dict key -> diffusers' AutoencoderKL / VQModel key (``num_levels``: len(ch_mult))."""
    side, _, name = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv, quantize.embedding.weight
    parts = name.split(".")
    if parts[0] in ("down", "up"):  # down.{i}.block.{j}.conv1.weight, up.{i}.attn.{j}.q.bias, up.{i}.upsample.conv.bias
        kind, level, rest = parts[0], int(parts[1]), parts[2:]
        level = level if kind == "down" else num_levels - 1 - level  # diffusers' decoder lists the lowest level first
        prefix = f"{side}.{kind}_blocks.{level}"
        if rest[0] in ("downsample", "upsample"):
            return f"{prefix}.{rest[0]}rs.0.{'.'.join(rest[1:])}"
        return _sublayer(f"{prefix}.{'resnets' if rest[0] == 'block' else 'attentions'}.{rest[1]}", rest[0], rest[2:])
    if parts[0] == "mid":  # mid.block_1 / mid.block_2 / mid.attn_1
        if parts[1] == "attn_1":
            return _sublayer(f"{side}.mid_block.attentions.0", "attn", parts[2:])
        return _sublayer(f"{side}.mid_block.resnets.{int(parts[1][len('block_'):]) - 1}", "block", parts[2:])
    if parts[0] == "norm_out":
        return f"{side}.conv_norm_out.{parts[1]}"
    return key  # conv_in, conv_out


def _sublayer(prefix: str, kind: str, rest: list[str]) -> str:
    layers = _RESNET_LAYERS if kind == "block" else _ATTENTION_LAYERS
    return f"{prefix}.{layers[rest[0]]}.{rest[1]}"


def autoencoder_to_diffusers(model: Autoencoder, scaling_factor: float) -> nn.Module:
    """The equivalent diffusers ``AutoencoderKL`` (KL) or ``VQModel`` (VQ), on the model's device and dtype.

    ``scaling_factor``: stage 2's latent scale (``FrozenFirstStage.scale_factor``), which diffusers pipelines apply.
    Dropout and the VQ commitment weight have no diffusers setting; inference does not use them.
    """
    diffusers = import_extra("diffusers")
    config = diffusers_config(model, scaling_factor)
    target = (diffusers.AutoencoderKL if model.regularizer == "kl" else diffusers.VQModel)(**config)
    num_levels = len(model.config["ch_mult"])
    state = {diffusers_key(key, num_levels): _as_linear_weight(key, value.detach())
             for key, value in model.state_dict().items()}
    load_state_strictly(target, state, Path(f"diffusers {type(target).__name__}"))
    reference = next(model.parameters())
    target.to(reference.device).train(model.training)
    return target if reference.dtype == torch.float32 else target.to(reference.dtype)


def diffusers_config(model: Autoencoder, scaling_factor: float) -> dict[str, Any]:
    """The diffusers AutoencoderKL / VQModel config of ``model``; a ConfigError names what diffusers cannot hold."""
    config = model.config
    if config["ch_mult"][0] != 1:
        raise ConfigError(f"ch_mult={config['ch_mult']} does not map to diffusers: its encoder's conv_in outputs "
                          "block_out_channels[0] directly, so ch_mult must start with 1")
    if config["regularizer"] == "kl" and config["embed_dim"] != config["z_channels"]:
        raise ConfigError(f"embed_dim={config['embed_dim']} != z_channels={config['z_channels']} does not map to "
                          "diffusers' AutoencoderKL, whose latent_channels is both")
    encoder_attention = [len(level.attn) > 0 for level in model.encoder.down]
    if encoder_attention != [len(level.attn) > 0 for level in model.decoder.up]:
        raise ConfigError(f"attn_resolutions={config['attn_resolutions']} at resolution={config['resolution']} puts "
                          "attention at different levels of the encoder and the decoder; diffusers ties them: use a "
                          "resolution divisible by the downsampling factor")
    decoder_attention = encoder_attention[::-1]  # diffusers' up blocks start at the lowest resolution
    common = dict(
        in_channels=config["in_channels"], out_channels=config["out_channels"],
        down_block_types=[("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D") for a in encoder_attention],
        up_block_types=[("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D") for a in decoder_attention],
        block_out_channels=[config["ch"] * mult for mult in config["ch_mult"]],
        layers_per_block=config["num_res_blocks"], act_fn="silu", latent_channels=config["z_channels"],
        norm_num_groups=32, sample_size=config["resolution"], scaling_factor=float(scaling_factor),
        mid_block_add_attention=True,
        force_upcast=True,  # decode in float32 when a pipeline runs in float16, as Stable Diffusion's VAE does
    )  # fmt: skip
    if config["regularizer"] == "kl":
        return dict(common, use_quant_conv=True, use_post_quant_conv=True)
    return dict(common, num_vq_embeddings=config["codebook_size"], vq_embed_dim=config["embed_dim"],
                norm_type="group", lookup_from_codebook=False)


def autoencoder_from_diffusers(source: Union[str, Path, nn.Module]) -> tuple[Autoencoder, float]:
    """An Autoencoder and diffusers' ``scaling_factor`` (Stable Diffusion's VAE: 0.18215) from a diffusers
    ``AutoencoderKL`` / ``VQModel``: the model itself, its folder (config.json + weights), or a pipeline folder
    whose ``vae/`` or ``vqvae/`` holds it."""
    diffusers_model = _load_diffusers_model(Path(source)) if isinstance(source, (str, Path)) else source
    name = type(diffusers_model).__name__
    if name not in DIFFUSERS_CLASSES:
        raise ConfigError(f"diffusers {name} does not map onto lightning_ldm's Autoencoder: only "
                          f"{' and '.join(DIFFUSERS_CLASSES)} do")
    config = config_from_diffusers(name, dict(diffusers_model.config))
    model = build_autoencoder(config)
    _check_attention_levels(model, config, name)
    num_levels = len(config["ch_mult"])
    ours = {diffusers_key(key, num_levels): key for key in model.state_dict()}
    state = {}
    for key, value in diffusers_model.state_dict().items():
        our_key = ours.get(key, key)  # an unknown key stays as it is: load_state_strictly names it
        state[our_key] = _as_conv_weight(our_key, value.detach().to("cpu", torch.float32))
    load_state_strictly(model, state, Path(str(source) if isinstance(source, (str, Path)) else f"diffusers {name}"))
    return model, float(diffusers_model.config["scaling_factor"])


def config_from_diffusers(class_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Our Autoencoder kwargs for a diffusers AutoencoderKL / VQModel config; a ConfigError names what does not map."""
    def refuse(what: str) -> ConfigError:
        return ConfigError(f"diffusers {class_name} with {what} does not map onto lightning_ldm's Autoencoder")

    if config.get("act_fn", "silu") not in ("silu", "swish"):
        raise refuse(f"act_fn={config['act_fn']!r} (ours is SiLU)")
    if config.get("norm_num_groups", 32) != 32:
        raise refuse(f"norm_num_groups={config['norm_num_groups']} (ours is 32)")
    if not config.get("mid_block_add_attention", True):
        raise refuse("mid_block_add_attention=false (ours always has the mid-block attention)")
    if class_name == "VQModel" and config.get("norm_type", "group") != "group":
        raise refuse(f"norm_type={config['norm_type']!r} (ours is GroupNorm)")
    if class_name == "AutoencoderKL":
        for key in ("use_quant_conv", "use_post_quant_conv"):
            if not config.get(key, True):
                raise refuse(f"{key}=false (ours always has it)")
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise refuse(f"{key} set (stage 2 only scales latents by scale_factor)")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    channels = [int(c) for c in config["block_out_channels"]]
    if any(t not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D") for t in down) or any(
            t not in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D") for t in up):
        raise refuse(f"down_block_types={down}, up_block_types={up} (ours: [Attn]DownEncoderBlock2D, "
                     "[Attn]UpDecoderBlock2D)")
    encoder_attention = [t.startswith("Attn") for t in down]
    if len(down) != len(channels) or encoder_attention != [t.startswith("Attn") for t in reversed(up)]:
        raise refuse(f"down_block_types={down}, up_block_types={up} (ours has attention at the same levels of the "
                     "encoder and the decoder)")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise refuse(f"block_out_channels={channels} (ours are multiples of the first)")
    resolution = config.get("sample_size", 256)
    resolution = int(resolution[0] if isinstance(resolution, (list, tuple)) else resolution)
    latent_channels = int(config["latent_channels"])
    ours = dict(
        in_channels=int(config["in_channels"]), out_channels=int(config["out_channels"]), ch=ch,
        ch_mult=[c // ch for c in channels], num_res_blocks=int(config["layers_per_block"]),
        attn_resolutions=[resolution // 2**i for i, a in enumerate(encoder_attention) if a], resolution=resolution,
        z_channels=latent_channels, dropout=0.0,
    )  # fmt: skip
    if class_name == "AutoencoderKL":
        return dict(ours, embed_dim=latent_channels, regularizer="kl")
    return dict(ours, embed_dim=int(config.get("vq_embed_dim") or latent_channels), regularizer="vq",
                codebook_size=int(config["num_vq_embeddings"]))


def _check_attention_levels(model: Autoencoder, config: dict, class_name: str) -> None:
    wanted = [resolution in config["attn_resolutions"] for resolution in _level_resolutions(config)]
    found = [len(level.attn) > 0 for level in model.decoder.up]
    if found != wanted:  # a sample_size not divisible by the downsampling factor
        raise ConfigError(f"diffusers {class_name} with sample_size={config['resolution']} and attention blocks "
                          "does not map onto lightning_ldm's Autoencoder: its levels' resolutions do not halve evenly")


def _level_resolutions(config: Mapping[str, Any]) -> list[int]:
    return [config["resolution"] // 2**i for i in range(len(config["ch_mult"]))]


# --------------------------------------------------------------------------- one entry point
def load_pretrained_autoencoder(path: Union[str, Path], config: Optional[Architecture] = None
                                ) -> tuple[Autoencoder, Optional[float]]:
    """An Autoencoder from pretrained weights of another codebase, and the latent scale they come with (if any).

    ``path``: a diffusers AutoencoderKL / VQModel folder (or its weights file), a diffusers pipeline folder with
    ``vae/`` or ``vqvae/``, an original CompVis checkpoint (``.ckpt`` / ``.pt`` / ``.pth`` / ``.safetensors``, of an
    autoencoder or a full LatentDiffusion model), or a lightning_ldm export. ``config`` (our Autoencoder kwargs or a
    preset name) is required for original checkpoints, which carry no architecture; for a diffusers model it must
    describe the same architecture, and then sets what diffusers does not store (resolution, dropout).

    The scale: diffusers' ``scaling_factor``, or a LatentDiffusion checkpoint's ``scale_factor`` buffer, else None.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise CheckpointError(f"pretrained autoencoder not found: {source}")
    folder = diffusers_model_folder(source)
    if folder is not None:
        model, scale = autoencoder_from_diffusers(folder)
        return (model if config is None else _with_config(model, config, source)), scale
    if source.is_dir():
        raise CheckpointError(
            f"{source} is a folder but not a diffusers model: expected config.json with _class_name "
            f"{' or '.join(DIFFUSERS_CLASSES)}, or a pipeline folder with {'/ or '.join(DIFFUSERS_SUBFOLDERS)}/")
    if _is_our_export(source):
        return load_autoencoder_export(source)[0], None
    state = read_weights(source)
    if not is_original_layout(state):
        raise CheckpointError(_unknown_layout_message(source, state))
    if config is None:
        raise ConfigError(
            f"{source} is an original CompVis checkpoint, which stores no architecture: give its Autoencoder kwargs "
            f"or a preset name (autoencoder.architecture=kl-f8 in stage 2; presets: {', '.join(PRESETS)})")
    return autoencoder_from_original(state, config, source), original_scale_factor(state)


def pretrained_autoencoder_kind(path: Union[str, Path]) -> Optional[Literal["diffusers", "original"]]:
    """What ``load_pretrained_autoencoder`` would read at ``path``: a diffusers model, an original checkpoint, or
    None (a lightning_ldm file, a missing or unreadable path, another layout). Checkpoints are memory-mapped, so
    this costs little even for a multi-GiB Stable Diffusion file."""
    source = Path(path).expanduser()
    if diffusers_model_folder(source) is not None:
        return "diffusers"
    if not source.is_file() or source.suffix not in (*TORCH_SUFFIXES, ".safetensors") or _is_our_export(source):
        return None
    try:
        keys = _safetensors_keys(source) if source.suffix == ".safetensors" else read_weights(source)
    except CheckpointError:
        return None
    return "original" if is_original_layout(keys) else None


def diffusers_model_folder(source: Path) -> Optional[Path]:
    """The diffusers model folder at ``source``: itself, its vae/ or vqvae/ (a pipeline), or the folder of a
    diffusers weights file; None if it is none of these."""
    if source.is_file() and source.name in DIFFUSERS_WEIGHT_FILES:
        source = source.parent
    if not source.is_dir():
        return None
    for folder in (source, *(source / name for name in DIFFUSERS_SUBFOLDERS)):
        if _diffusers_class_name(folder) is not None:
            return folder
    return None


def build_autoencoder(config: Architecture) -> Autoencoder:
    return build(Autoencoder, PRESETS, config, "autoencoder")


def architecture_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """What fixes the weights' shapes: config keys, with attention as level indices (0 = full resolution)."""
    summary = {key: config.get(key) for key in ("regularizer", "in_channels", "ch", "num_res_blocks", "z_channels",
                                                "embed_dim")}
    summary["out_channels"] = config.get("out_channels") or config.get("in_channels", 3)
    summary["ch_mult"] = [int(m) for m in config["ch_mult"]]
    attention = [int(r) for r in config.get("attn_resolutions", [])]
    summary["attention_levels"] = [i for i, r in enumerate(_level_resolutions(config)) if r in attention]
    if config.get("regularizer") == "vq":
        summary["codebook_size"] = config.get("codebook_size")
    return summary


# --------------------------------------------------------------------------- helpers
def _with_config(model: Autoencoder, config: Architecture, source: Path) -> Autoencoder:
    """``model`` rebuilt with the given config, which must describe the same architecture."""
    wanted = build_autoencoder(config)
    given, found = architecture_summary(wanted.config), architecture_summary(model.config)
    differences = [f"{key} {given[key]} vs {found[key]}" for key in given if given[key] != found[key]]
    if differences:
        raise ConfigError(f"{source}: the given autoencoder architecture differs from the diffusers model's "
                          f"(given vs found: {'; '.join(differences)})")
    load_state_strictly(wanted, model.state_dict(), source)
    return wanted


def _as_conv_weight(key: str, value: Any) -> Any:
    """An attention projection as our 1x1 conv weight (C, C, 1, 1), from diffusers' (or a re-export's) Linear."""
    if _ATTENTION_PROJECTION.fullmatch(key) and isinstance(value, torch.Tensor) and value.ndim == 2:
        return value[:, :, None, None]
    return value


def _as_linear_weight(key: str, value: torch.Tensor) -> torch.Tensor:
    """An attention projection as diffusers' Linear weight (C, C)."""
    return value[:, :, 0, 0] if _ATTENTION_PROJECTION.fullmatch(key) else value




def _diffusers_class_name(folder: Path) -> Optional[str]:
    """``_class_name`` of a diffusers model folder's config.json, else None."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        content = json.loads(config.read_text())
    except (ValueError, OSError):
        return None
    is_diffusers = isinstance(content, dict) and "_diffusers_version" in content  # not a transformers config.json
    name = content.get("_class_name") if is_diffusers else None
    return name if isinstance(name, str) else None


def _load_diffusers_model(source: Path) -> nn.Module:
    folder = diffusers_model_folder(source.expanduser())
    if folder is None:
        raise CheckpointError(f"{source} is not a diffusers model folder (config.json with _class_name) nor a "
                              f"pipeline folder with {'/ or '.join(DIFFUSERS_SUBFOLDERS)}/")
    name = _diffusers_class_name(folder)
    if name not in DIFFUSERS_CLASSES:
        raise ConfigError(f"{folder}: diffusers {name} does not map onto lightning_ldm's Autoencoder: only "
                          f"{' and '.join(DIFFUSERS_CLASSES)} do")
    diffusers = import_extra("diffusers")
    from diffusers.utils import is_accelerate_available

    try:  # low_cpu_mem_usage needs accelerate; asked for without it, diffusers warns at every load
        return getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True,
                                                        low_cpu_mem_usage=is_accelerate_available())
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{folder}: diffusers could not load it ({type(error).__name__}: {message})") from None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:
        raise CheckpointError(f"{path} is not a safetensors file ({type(error).__name__})") from None


def _is_our_export(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return safetensors_metadata(path).get("format") == EXPORT_FORMAT
    except CheckpointError:
        return False


def _unknown_layout_message(source: Path, state: Mapping[str, Any]) -> str:
    keys = list(state)[:4]
    if any(str(key).startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in state):
        found = f"diffusers-layout weights without their config.json (keys {keys})"
    else:
        found = f"{len(state)} tensors of an unknown layout (first keys {keys})"
    return (f"{source} holds {found}; accepted: an original CompVis checkpoint (keys first_stage_model.* or "
            "encoder.down.*), a diffusers AutoencoderKL/VQModel folder or a pipeline folder with vae/ or vqvae/, "
            "or a lightning_ldm export")
