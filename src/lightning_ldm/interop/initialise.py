"""``module.init_from``: a new run's starting weights from another model, to fine-tune it.

``resume=`` continues a run exactly (optimizer, step, EMA, RNG). ``init_from`` only fills the UNet and the
conditioner's embedders before training starts: the optimizer and the step counter start fresh and the EMA starts
as a copy of the loaded weights. Sources, each loaded strictly into the architecture the config builds:

- one of our stage-2 runs or files (its EMA weights: what it samples with), UNet and conditioner whole, the
  tokenizer of a jointly trained text encoder included;
- a diffusers folder (a pipeline's ``unet/``, or a UNet folder): the UNet, its class table, and an
  ``LDMBertModel`` text encoder with its tokenizer (``bert/``, ``tokenizer/``) when the model has ours;
- an original CompVis checkpoint: ``model.diffusion_model.*``, the class table (``label_emb``, or the
  cross-attention ``cond_stage_model.embedding``) and the text encoder (``cond_stage_model.transformer.*``). That
  encoder reads BERT's WordPiece ids and the checkpoint holds no vocabulary: it is loaded when a ``tokenizer/``
  folder (a transformers tokenizer, e.g. bert-base-uncased's) lies beside the checkpoint, and left out otherwise.
"""

from pathlib import Path
from typing import Union

import torch
from torch import nn

from lightning_ldm.diffusion.checkpoint import EXPORT_FORMAT as DIFFUSION_FORMAT
from lightning_ldm.errors import CheckpointError
from lightning_ldm.file_format import read_weights, resolve_model_file, safetensors_metadata, torch_load
from lightning_ldm.strict_loading import load_state_strictly

ORIGINAL_CLASS_TABLE = "cond_stage_model.embedding.weight"  # LDM's ClassEmbedder (cross-attention class models)
TEXT_PREFIX = "cond_stage_model.transformer."  # LDM's BERTEmbedder


def _copy_class_table(conditioner, table: torch.Tensor, source: Path) -> None:
    """Rows of a class table into the ClassEmbedder: all of them if it has a null row too, else the classes (the
    null row keeps its initialisation)."""
    embedder = conditioner.embedder("class")
    if embedder is None:
        raise CheckpointError(f"{source} has a class table ({table.shape[0]} rows) but this model is not class-"
                              "conditional: set conditioning=class or class_crossattn")
    ours = embedder.table.weight
    if table.shape[0] not in (ours.shape[0], embedder.num_classes) or table.shape[1] != ours.shape[1]:
        raise CheckpointError(f"{source}: its class table is {tuple(table.shape)}, this model's "
                              f"({embedder.num_classes} classes + the null class) {tuple(ours.shape)}")
    with torch.no_grad():
        ours[: table.shape[0]].copy_(table)


def _from_diffusers(path: Path, unet: nn.Module, conditioner) -> list[str]:
    from lightning_ldm.interop.unet import unet_from_diffusers

    loaded, table = unet_from_diffusers(path, expected_config=unet.config)
    unet.load_state_dict(loaded.state_dict())
    parts = ["UNet"]
    if table is not None:
        _copy_class_table(conditioner, table, path)
        parts.append("class table")
    text = conditioner.embedder("text")
    if text is not None and (path / "bert").is_dir():
        from lightning_ldm.interop.text import text_encoder_from_diffusers, tokenizer_from_transformers

        length = text.settings["length"]
        encoder = text_encoder_from_diffusers(path / "bert", length=length,
                                              include_logits_head=text.encoder.to_logits is not None)
        load_state_strictly(text.encoder, encoder.state_dict(), path / "bert")
        text.tokenizer = tokenizer_from_transformers(path / "tokenizer", length=length)
        parts.append("text encoder and tokenizer")
    return parts


def _from_original(path: Path, state, unet: nn.Module, conditioner) -> list[str]:
    from lightning_ldm.interop.unet import ORIGINAL_PREFIX, unet_from_original

    if not any(str(key).startswith(ORIGINAL_PREFIX) for key in state):
        raise CheckpointError(f"module.init_from={path} is neither a lightning_ldm stage-2 checkpoint nor an original "
                              f"LDM checkpoint (no {ORIGINAL_PREFIX}* keys; first keys: {list(state)[:3]})")
    loaded, table = unet_from_original(state, unet.config, source=str(path))
    unet.load_state_dict(loaded.state_dict())
    parts = ["UNet"]
    table = table if table is not None else state.get(ORIGINAL_CLASS_TABLE)
    if table is not None:
        _copy_class_table(conditioner, table, path)
        parts.append("class table")
    text = conditioner.embedder("text")
    if text is not None and any(str(key).startswith(TEXT_PREFIX) for key in state):
        tokenizer_folder = path.parent / "tokenizer"
        if not tokenizer_folder.is_dir():
            print(f"Initial weights: the text encoder of {path} is left out: it reads BERT's WordPiece ids; put that "
                  f"tokenizer (e.g. bert-base-uncased's files) in {tokenizer_folder} to load both")
        else:
            from lightning_ldm.interop.text import text_encoder_from_original, tokenizer_from_transformers

            load_state_strictly(text.encoder, text_encoder_from_original(state, text.settings).state_dict(),
                                path)
            text.tokenizer = tokenizer_from_transformers(tokenizer_folder, length=text.settings["length"])
            parts.append("text encoder and tokenizer")
    return parts


def _read(path: Path):
    try:
        return torch_load(path)
    except Exception as error:
        raise CheckpointError(f"module.init_from={path} cannot be read as a checkpoint ({type(error).__name__})") from None


def _from_ours(path: Path, unet: nn.Module, conditioner) -> list[str]:
    """Our stage-2 file's EMA weights (what it samples with), UNet and conditioner whole."""
    from lightning_ldm.diffusion.checkpoint import load_diffusion_model

    networks = load_diffusion_model(str(path)).ema.model
    load_state_strictly(unet, networks["unet"].state_dict(), path)
    load_state_strictly(conditioner, networks["conditioner"].state_dict(), path)
    return ["UNet", "conditioner"]


def initialise_from(source: Union[str, Path], unet: nn.Module, conditioner) -> str:
    """Load another model's weights into ``unet`` and ``conditioner`` (see the module docstring); returns what
    was loaded, for the log."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"module.init_from={path} does not exist: give a stage-2 run or file, an original LDM "
                              "checkpoint or a diffusers folder")
    if path.is_dir() and not ((path / "unet").is_dir() or (path / "config.json").is_file()):
        path = resolve_model_file(path)  # one of our run directories
    if path.is_dir():
        parts = _from_diffusers(path, unet, conditioner)
    elif path.suffix == ".safetensors" and safetensors_metadata(path).get("format") == DIFFUSION_FORMAT:
        parts = _from_ours(path, unet, conditioner)
    elif path.suffix == ".safetensors":
        parts = _from_original(path, read_weights(path), unet, conditioner)
    else:
        checkpoint = _read(path)
        if isinstance(checkpoint, dict) and (checkpoint.get("lightning_ldm") or {}).get("kind") == "diffusion":
            parts = _from_ours(path, unet, conditioner)
        else:
            state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
            parts = _from_original(path, state, unet, conditioner)
    return f"{', '.join(parts)} from {path}"

