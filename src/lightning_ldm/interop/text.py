"""The paper's text encoder (``TransformerTextEncoder``) and its ``CaptionTokenizer``, in from and out to the
original CompVis layout, diffusers' ``LDMBertModel`` and a ``transformers`` tokenizer.

The original repository's ``BERTEmbedder`` stores a ``TransformerWrapper(attn_layers=Encoder(...))`` of its vendored
``ldm/modules/x_transformer.py`` under ``cond_stage_model.transformer.``. ``AttentionLayers`` keeps one
``ModuleList([norm, block, Residual()])`` per layer, the attention of pair ``i`` at ``layers.{2i}`` and its
feed-forward at ``layers.{2i+1}``; that ``FeedForward.net`` is ``Sequential(Sequential(Linear, GELU), Dropout,
Linear)``, so its linears are ``net.0.0`` and ``net.2`` (ours, ``Sequential(Linear, GELU, Dropout, Linear)``, has
``net.0`` and ``net.3``). ``Residual`` and ``Dropout`` hold no weights.

diffusers' ``LDMBertModel`` (``pipelines/latent_diffusion/pipeline_latent_diffusion.py``) is the same network, one
weight for one weight: learned token and position embeddings added unscaled, pre-norm attention with bias-free
q/k/v and a biased ``out_proj``, a pre-norm exact-GELU feed-forward, a final LayerNorm, and a ``to_logits`` head it
always builds. What differs:

- scaling: LDMBert multiplies q by ``head_dim ** -0.5`` before q.k, ours (SDPA) scales q.k: float rounding only.
  ``LDMBertConfig.scale_embedding`` is stored but never read by the model: neither side scales embeddings;
- ``attention_mask``: LDMBert adds ``finfo.min`` at masked keys for every query, as ours masks them, so the two
  agree for every row with a real token (our tokenizer always writes [CLS] and [SEP]). On an all-padding row
  ours attends to every key by its scores, LDMBert's scores vanish under ``finfo.min`` (uniform attention);
- ``LDMTextToImagePipeline`` tokenizes to ``max_length=77`` (hard-coded) and calls ``self.bert(input_ids)``
  WITHOUT a mask, as the original ``BERTEmbedder`` does: real tokens attend to the padding, which ours masks. Its
  hidden states therefore match ours only for a caption with no padding at all; an encoder shorter than 77
  needs positions it never learned (see ``text_encoder_to_diffusers``);
- dropout (training only): ``LDMBertConfig.dropout`` (0.1 by default) drops the embeddings AND both residual
  branches, ``attention_dropout`` the attention weights, ``activation_dropout`` the GELU output; ours drops the
  embeddings, the attention weights and the GELU output with one rate. Outputs in eval mode are the same.
"""

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_ldm.conditioning.text_encoder import TransformerTextEncoder
from lightning_ldm.conditioning.tokenizer import SPECIAL_TOKENS, CaptionTokenizer
from lightning_ldm.extras import import_extra
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.strict_loading import load_state_strictly

ORIGINAL_PREFIX = "cond_stage_model.transformer."
PIPELINE_LENGTH = 77  # LDMTextToImagePipeline's tokenizer(..., max_length=77)
_UNSET_LENGTH = 100_000  # transformers writes a huge model_max_length (VERY_LARGE_INTEGER) when none is set

# Our parameter names -> x-transformers' (TransformerWrapper); blocks.{i} -> attn_layers.layers.{2i} and {2i+1}.
_ORIGINAL_TOP = {"token_emb.weight": "token_emb.weight", "pos_emb.weight": "pos_emb.emb.weight",
                 "norm.weight": "norm.weight", "norm.bias": "norm.bias",
                 "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}
_ORIGINAL_BLOCK = {
    "attn_norm.weight": "attn_layers.layers.{a}.0.weight", "attn_norm.bias": "attn_layers.layers.{a}.0.bias",
    "attn.to_q.weight": "attn_layers.layers.{a}.1.to_q.weight",
    "attn.to_k.weight": "attn_layers.layers.{a}.1.to_k.weight",
    "attn.to_v.weight": "attn_layers.layers.{a}.1.to_v.weight",
    "attn.to_out.weight": "attn_layers.layers.{a}.1.to_out.weight",
    "attn.to_out.bias": "attn_layers.layers.{a}.1.to_out.bias",
    "ff_norm.weight": "attn_layers.layers.{f}.0.weight", "ff_norm.bias": "attn_layers.layers.{f}.0.bias",
    "ff.net.0.weight": "attn_layers.layers.{f}.1.net.0.0.weight",
    "ff.net.0.bias": "attn_layers.layers.{f}.1.net.0.0.bias",
    "ff.net.3.weight": "attn_layers.layers.{f}.1.net.2.weight",
    "ff.net.3.bias": "attn_layers.layers.{f}.1.net.2.bias",
}
# Our parameter names -> LDMBertModel's.
_DIFFUSERS_TOP = {"token_emb.weight": "model.embed_tokens.weight", "pos_emb.weight": "model.embed_positions.weight",
                  "norm.weight": "model.layer_norm.weight", "norm.bias": "model.layer_norm.bias",
                  "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}
_DIFFUSERS_BLOCK = {
    "attn_norm.weight": "model.layers.{i}.self_attn_layer_norm.weight",
    "attn_norm.bias": "model.layers.{i}.self_attn_layer_norm.bias",
    "attn.to_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attn.to_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attn.to_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attn.to_out.weight": "model.layers.{i}.self_attn.out_proj.weight",
    "attn.to_out.bias": "model.layers.{i}.self_attn.out_proj.bias",
    "ff_norm.weight": "model.layers.{i}.final_layer_norm.weight",
    "ff_norm.bias": "model.layers.{i}.final_layer_norm.bias",
    "ff.net.0.weight": "model.layers.{i}.fc1.weight", "ff.net.0.bias": "model.layers.{i}.fc1.bias",
    "ff.net.3.weight": "model.layers.{i}.fc2.weight", "ff.net.3.bias": "model.layers.{i}.fc2.bias",
}


# --------------------------------------------------------------------------------------------------- helpers


def _names(encoder: TransformerTextEncoder, top: Mapping[str, str], block: Mapping[str, str]) -> dict[str, str]:
    """Every one of ``encoder``'s state keys -> its name in another layout (a KeyError if ours gained a weight)."""
    names = {}
    for key in encoder.state_dict():
        found = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if found is None:
            names[key] = top[key]
        else:
            i = int(found[1])
            names[key] = block[found[2]].format(i=i, a=2 * i, f=2 * i + 1)
    return names


class _Renamed(nn.Module):
    """``inner`` under other parameter names, so that load_state_strictly checks and reports in those names."""

    def __init__(self, inner: nn.Module, names: Mapping[str, str]) -> None:
        super().__init__()
        self.inner, self.names = inner, dict(names)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return {self.names[key]: value for key, value in self.inner.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        back = {theirs: ours for ours, theirs in self.names.items()}
        return self.inner.load_state_dict({back[key]: value for key, value in state.items()}, strict=strict,
                                          assign=assign)


def _build(settings: Mapping[str, Any]) -> TransformerTextEncoder:
    try:
        return TransformerTextEncoder(**settings)
    except TypeError as error:  # an unknown or missing setting
        raise ConfigError(f"text encoder settings {dict(settings)}: {error}") from None


def _settings(encoder: TransformerTextEncoder) -> dict[str, Any]:
    """The constructor arguments that rebuild ``encoder``'s architecture."""
    heads, dim_head, ff_mult = 8, 64, 4  # the constructor's defaults, for an encoder without blocks
    if len(encoder.blocks):
        block = encoder.blocks[0]
        heads = block.attn.heads
        dim_head = block.attn.to_q.out_features // heads
        ff_mult = block.ff.net[0].out_features // encoder.dim
    return dict(vocab_size=encoder.vocab_size, length=encoder.length, dim=encoder.dim, depth=len(encoder.blocks),
                heads=heads, dim_head=dim_head, ff_mult=ff_mult, dropout=encoder.emb_dropout.p,
                include_logits_head=encoder.to_logits is not None)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _import_ldmbert() -> tuple[type, type]:
    import_extra("diffusers")
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    return LDMBertConfig, LDMBertModel


def _import_transformers() -> Any:
    import_extra("diffusers")
    try:
        import transformers
    except ImportError:
        raise ConfigError('a tokenizer in transformers\' format needs transformers: pip install "lightning_ldm[diffusers]"'
                          ) from None
    return transformers


# ----------------------------------------------------------------------------------- the original layout


def text_encoder_from_original(state: Mapping[str, Any], settings: Mapping[str, Any]) -> TransformerTextEncoder:
    """Our encoder from the original checkpoint's ``cond_stage_model.transformer.*`` weights (the prefix may be
    stripped already; a whole ``.ckpt`` dict with ``state_dict`` is read too). ``settings`` are
    ``TransformerTextEncoder``'s arguments, e.g. ``PAPER_TXT2IMG``; a key or shape that does not fit them is a
    CheckpointError naming it in the original's names."""
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if any(key.startswith(ORIGINAL_PREFIX) for key in state):  # a whole LDM state: only the text encoder's part
        state = {key[len(ORIGINAL_PREFIX):]: value for key, value in state.items() if key.startswith(ORIGINAL_PREFIX)}
    encoder = _build(settings)
    names = _names(encoder, _ORIGINAL_TOP, _ORIGINAL_BLOCK)
    load_state_strictly(_Renamed(encoder, names), dict(state), f"the original text encoder ({ORIGINAL_PREFIX}*)")
    return encoder


def text_encoder_to_original(encoder: TransformerTextEncoder, prefix: str = ORIGINAL_PREFIX) -> dict[str, Tensor]:
    """``encoder``'s weights under the original checkpoint's names (sharing storage, as ``state_dict`` does)."""
    names = _names(encoder, _ORIGINAL_TOP, _ORIGINAL_BLOCK)
    return {prefix + names[key]: value for key, value in encoder.state_dict().items()}


# ------------------------------------------------------------------------------------------------ diffusers


def text_encoder_to_diffusers(encoder: TransformerTextEncoder, length: int = PIPELINE_LENGTH) -> Any:
    """An ``LDMBertModel`` (eval mode, ``encoder``'s device and dtype) computing ``encoder``'s hidden states.

    ``max_position_embeddings`` is ``max(encoder.length, length)``: LDMTextToImagePipeline always feeds 77 ids.
    Positions past ``encoder.length`` are zeros: the encoder never learned them, so no value is right; zeros are
    reproducible, add nothing to the padding's token embedding there, and are cut off again by
    ``text_encoder_from_diffusers(length=...)``. An encoder without a ``to_logits`` head gets a zero one, since
    LDMBert always builds it (nothing calls it)."""
    LDMBertConfig, LDMBertModel = _import_ldmbert()
    if int(length) < 1:
        raise ConfigError(f"text_encoder_to_diffusers: length must be at least 1, got {length}")
    settings = _settings(encoder)
    positions = max(encoder.length, int(length))
    config = LDMBertConfig(
        vocab_size=encoder.vocab_size, max_position_embeddings=positions, encoder_layers=settings["depth"],
        encoder_ffn_dim=encoder.dim * settings["ff_mult"], encoder_attention_heads=settings["heads"],
        head_dim=settings["dim_head"], d_model=encoder.dim, activation_function="gelu",
        # LDMBert's `dropout` also drops the residual branches, which ours never does: 0, and our one rate on
        # the attention weights and the GELU output (ours also drops the embeddings, which LDMBert cannot alone)
        dropout=0.0, attention_dropout=settings["dropout"], activation_dropout=settings["dropout"],
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"))
    names = _names(encoder, _DIFFUSERS_TOP, _DIFFUSERS_BLOCK)
    state = {names[key]: value.detach() for key, value in encoder.state_dict().items()}
    learned = state["model.embed_positions.weight"]
    state["model.embed_positions.weight"] = torch.cat(
        [learned, learned.new_zeros(positions - encoder.length, encoder.dim)])
    if encoder.to_logits is None:
        state["to_logits.weight"] = learned.new_zeros(encoder.vocab_size, encoder.dim)
        state["to_logits.bias"] = learned.new_zeros(encoder.vocab_size)
    model = LDMBertModel(config)
    model.load_state_dict(state, strict=True)  # a mismatch here is a bug in the tables above
    return model.to(device=learned.device, dtype=learned.dtype).eval()


def _load_ldmbert(source: Any, model_class: type) -> Any:
    if not isinstance(source, (str, Path)):
        if not isinstance(source, model_class):
            raise ConfigError(f"text_encoder_from_diffusers reads an LDMBertModel or its folder, "
                              f"got {type(source).__name__}")
        return source
    folder = Path(source)
    if not (folder / "config.json").is_file() and (folder / "bert" / "config.json").is_file():
        folder = folder / "bert"  # a whole LDMTextToImagePipeline folder
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no LDMBertModel here (no config.json)")
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: cannot read an LDMBertModel: {_first_line(error)}") from None
    wrong = {kind: list(info.get(kind) or [])[:3] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(wrong.values()):  # from_pretrained would leave these weights random, and only warn
        raise CheckpointError(f"{folder}: the weights do not match config.json ({wrong})")
    return model


def _settings_from_config(config: Any, length: Optional[int], include_logits_head: bool) -> dict[str, Any]:
    """Our constructor arguments for an LDMBertConfig, or one ConfigError line naming what ours cannot do."""
    where = f"LDMBertConfig({config.name_or_path or 'in memory'})"
    if config.activation_function != "gelu":
        raise ConfigError(f"{where}: activation_function {config.activation_function!r}; the text encoder's "
                          f"feed-forward is exact GELU ('gelu')")
    if config.encoder_ffn_dim % config.d_model:
        raise ConfigError(f"{where}: encoder_ffn_dim {config.encoder_ffn_dim} is not a whole multiple of d_model "
                          f"{config.d_model} (the text encoder's ff_mult)")
    if config.attention_dropout != config.activation_dropout:
        raise ConfigError(f"{where}: attention_dropout {config.attention_dropout} differs from activation_dropout "
                          f"{config.activation_dropout}; the text encoder has one dropout rate for both")
    positions = config.max_position_embeddings
    length = positions if length is None else int(length)
    if not 2 <= length <= positions:
        raise ConfigError(f"{where}: length {length} must be between 2 and max_position_embeddings {positions}")
    return dict(vocab_size=config.vocab_size, length=length, dim=config.d_model, depth=config.encoder_layers,
                heads=config.encoder_attention_heads, dim_head=config.head_dim,
                ff_mult=config.encoder_ffn_dim // config.d_model, dropout=float(config.attention_dropout),
                include_logits_head=include_logits_head)


def text_encoder_from_diffusers(source: Any, *, length: Optional[int] = None,
                                include_logits_head: bool = True) -> TransformerTextEncoder:
    """Our encoder from an ``LDMBertModel``, or a folder holding one (or a pipeline folder with ``bert/``).

    ``length`` keeps the first ``length`` positions (all ``max_position_embeddings`` by default).
    ``include_logits_head`` keeps LDMBert's ``to_logits`` (frozen, as ours keeps it); ``LDMBertConfig.dropout``
    (embeddings and residual branches, training only) is not carried: the rate is ``attention_dropout``."""
    _, LDMBertModel = _import_ldmbert()
    model = _load_ldmbert(source, LDMBertModel)
    encoder = _build(_settings_from_config(model.config, length, include_logits_head))
    state = dict(model.state_dict())
    state["model.embed_positions.weight"] = state["model.embed_positions.weight"][: encoder.length]
    if not include_logits_head:
        state.pop("to_logits.weight", None)
        state.pop("to_logits.bias", None)
    names = _names(encoder, _DIFFUSERS_TOP, _DIFFUSERS_BLOCK)
    load_state_strictly(_Renamed(encoder, names), state, f"LDMBertModel({model.config.name_or_path or 'in memory'})")
    return encoder.to(dtype=state["model.embed_tokens.weight"].dtype)


# ------------------------------------------------------------------------------------------------ tokenizer


def tokenizer_to_transformers(tokenizer: CaptionTokenizer) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` around a copy of ``tokenizer``'s ``tokenizers.Tokenizer``.

    Called as ``tok(captions, padding="max_length", max_length=tokenizer.length, truncation=True)`` it gives our
    ids and mask (normaliser, [CLS] ... [SEP] template and truncation travel in the backend; the library truncates
    before the template, so [SEP] is kept as ours keeps it). LDMTextToImagePipeline calls it with
    ``max_length=77``: captions then come out longer than ours whenever they have more than ``length`` tokens.
    No bos/eos: as BERT's tokenizer, [CLS] opens and [SEP] closes a caption."""
    transformers = _import_transformers()
    from tokenizers import Tokenizer

    pad, unk, cls, sep = SPECIAL_TOKENS
    backend = Tokenizer.from_str(json.dumps(json.loads(tokenizer.to_str())["tokenizer"]))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=tokenizer.length, padding_side="right", truncation_side="right",
        pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep,
        split_special_tokens=True,  # CaptionTokenizer sets encode_special_tokens: "[SEP]" in a caption is text
        model_input_names=["input_ids", "attention_mask"])  # no token_type_ids: LDMBert takes none


def tokenizer_from_transformers(source: Any, *, length: Optional[int] = None) -> CaptionTokenizer:
    """A CaptionTokenizer from a fast ``transformers`` tokenizer or its folder (or a pipeline folder with
    ``tokenizer/``), e.g. one saved from ``tokenizer_to_transformers`` or BERT's ``bert-base-uncased`` (with
    ``length=77``). ``length`` defaults to the tokenizer's ``model_max_length``. Special tokens written in a
    caption are always tokenized as text (``split_special_tokens``)."""
    transformers = _import_transformers()
    from tokenizers import Tokenizer

    name = type(source).__name__
    if isinstance(source, (str, Path)):
        folder = name = Path(source)
        if not (folder / "tokenizer_config.json").is_file() and (folder / "tokenizer").is_dir():
            folder = name = folder / "tokenizer"
        try:
            source = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"{folder}: cannot read a tokenizer: {_first_line(error)}") from None
    backend = getattr(source, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ConfigError(f"{name}: not a fast tokenizer (no tokenizers.Tokenizer backend)")
    if source.padding_side != "right" or source.truncation_side != "right":
        raise ConfigError(f"{name}: padding_side {source.padding_side!r} and truncation_side "
                          f"{source.truncation_side!r}; a CaptionTokenizer pads and truncates on the right")
    length = source.model_max_length if length is None else int(length)
    if length >= _UNSET_LENGTH:
        raise ConfigError(f"{name}: the tokenizer sets no model_max_length: pass length= (77 for LDM)")
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()  # CaptionTokenizer pads and truncates itself
    try:
        tokenizer = CaptionTokenizer(copy, length=length)
    except ValueError as error:  # no [PAD], [CLS] or [SEP], or a length under 2
        raise ConfigError(f"{name}: {error}") from None
    ids, mask = tokenizer.encode([""])
    if ids[0, : int(mask.sum())].tolist() != [tokenizer.cls_id, tokenizer.sep_id]:
        raise ConfigError(f"{name}: its template does not write [CLS] ... [SEP], as CaptionTokenizer expects")
    return tokenizer
