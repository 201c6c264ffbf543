"""The paper's text encoder and caption tokenizer in from and out to the original CompVis layout, diffusers'
LDMBertModel and a transformers tokenizer: same hidden states, same ids, one-line errors."""

import sys
import warnings

import pytest
import torch
from torch import Tensor

from lightning_ldm.conditioning.text_encoder import TransformerTextEncoder
from lightning_ldm.conditioning.tokenizer import CaptionTokenizer
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.interop.text import (ORIGINAL_PREFIX, text_encoder_from_diffusers, text_encoder_from_original,
                                        text_encoder_to_diffusers, text_encoder_to_original,
                                        tokenizer_from_transformers, tokenizer_to_transformers)

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel  # noqa: E402

LENGTH = 8
SETTINGS = dict(vocab_size=100, length=LENGTH, dim=64, depth=2, heads=2, dim_head=32)
CAPTIONS = ["a dog on a sofa", "two cats in the snow", "a red car near the river", "an old man under a tree",
            "a small boat on the beach", "the cafe at night", "three horses and a bird"]
PROBE = ["a dog on a sofa", "", "A RED Car, near the river!!", "the Café?",  # upper case, punctuation, accent
         "a dog and two cats and three horses on the beach at night",  # truncated to LENGTH
         "a [SEP] zebra"]  # a special token typed in a caption is text; an unseen word
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=SETTINGS["vocab_size"], length=LENGTH, progress=False)


def encode(tokenizer: CaptionTokenizer, captions: list[str]) -> tuple[Tensor, Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long caption's truncation warning
        return tokenizer.encode(captions)


def randomised(encoder: TransformerTextEncoder) -> TransformerTextEncoder:
    """LayerNorms start at ones/zeros: made distinct, so that swapping two norms in a mapping shows."""
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return encoder.eval()


@pytest.fixture
def encoder() -> TransformerTextEncoder:
    torch.manual_seed(0)
    return randomised(TransformerTextEncoder(**SETTINGS, include_logits_head=True))


def hidden(bert, ids: Tensor, mask: Tensor = None) -> Tensor:
    with torch.no_grad():
        return bert(ids, attention_mask=None if mask is None else mask.long()).last_hidden_state


def ours(encoder: TransformerTextEncoder, ids: Tensor, mask: Tensor = None) -> Tensor:
    with torch.no_grad():
        return encoder(ids, mask)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------- ours -> LDMBert


def test_ldmbert_config_and_zero_positions_past_our_length(encoder):
    bert = text_encoder_to_diffusers(encoder)
    c = bert.config
    assert (c.vocab_size, c.d_model, c.encoder_layers, c.encoder_attention_heads, c.head_dim, c.encoder_ffn_dim) == \
        (100, 64, 2, 2, 32, 256)
    assert c.max_position_embeddings == 77 and c.activation_function == "gelu" and c.dropout == 0.0
    positions = bert.model.embed_positions.weight
    assert torch.equal(positions[:LENGTH], encoder.pos_emb.weight) and not positions[LENGTH:].any()
    assert not bert.training
    assert text_encoder_to_diffusers(encoder, length=4).config.max_position_embeddings == LENGTH  # never fewer


def test_ldmbert_gives_our_hidden_states_given_our_mask(encoder, tokenizer):
    ids, mask = encode(tokenizer, PROBE)
    assert (~mask).any(dim=1).sum() >= 3  # padded captions are part of the probe
    bert = text_encoder_to_diffusers(encoder)
    assert (hidden(bert, ids, mask) - ours(encoder, ids, mask)).abs().max() < TOLERANCE


def test_without_a_mask_only_captions_that_fill_the_length_agree(encoder, tokenizer):
    """LDMTextToImagePipeline calls bert(input_ids) with no mask: real tokens then attend to the padding."""
    ids, mask = encode(tokenizer, PROBE)
    full = mask.all(dim=1)
    assert full.any() and not full.all()
    bert = text_encoder_to_diffusers(encoder)
    gap = (hidden(bert, ids) - ours(encoder, ids, mask)).abs().amax(dim=(1, 2))
    assert (gap[full] < TOLERANCE).all()
    assert (gap[~full] > 0.1).all()  # O(1) hidden states after the final LayerNorm: not rounding


def test_at_the_pipelines_77_tokens_the_mask_is_needed(encoder, tokenizer):
    """The pipeline pads to 77: even a caption that fills our length is followed by padding (at zero positions)."""
    ids, mask = encode(tokenizer, PROBE)
    pad = 77 - LENGTH
    ids77 = torch.nn.functional.pad(ids, (0, pad), value=tokenizer.pad_id)
    mask77 = torch.nn.functional.pad(mask, (0, pad), value=False)
    bert = text_encoder_to_diffusers(encoder)
    expected = ours(encoder, ids, mask)
    assert (hidden(bert, ids77, mask77)[:, :LENGTH] - expected).abs().max() < TOLERANCE
    assert ((hidden(bert, ids77)[:, :LENGTH] - expected).abs().amax(dim=(1, 2)) > 0.1).all()


def test_an_all_padding_mask_is_where_the_two_masks_differ(encoder, tokenizer):
    """Ours lets a row without real keys attend to every key by its scores; LDMBert's finfo.min swamps the scores
    (uniform attention). Our tokenizer never writes such a row: [CLS] and [SEP] are real."""
    ids, mask = encode(tokenizer, PROBE[:2])
    mask[1] = False
    gap = (hidden(text_encoder_to_diffusers(encoder), ids, mask) - ours(encoder, ids, mask)).abs().amax(dim=(1, 2))
    assert gap[0] < TOLERANCE and gap[1] > 1e-3


# ------------------------------------------------------------------------------------------- LDMBert -> ours


def tiny_ldmbert() -> LDMBertModel:
    torch.manual_seed(1)
    config = LDMBertConfig(vocab_size=100, max_position_embeddings=LENGTH, encoder_layers=2, encoder_ffn_dim=256,
                           encoder_attention_heads=2, head_dim=32, d_model=64)  # dropout 0.1: training only
    model = LDMBertModel(config).eval()
    with torch.no_grad():  # norms and biases start at ones/zeros under _init_weights
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def test_ldmbert_folder_to_ours_gives_the_same_outputs(tmp_path, tokenizer):
    bert = tiny_ldmbert()
    bert.save_pretrained(tmp_path / "pipeline" / "bert")
    ids, mask = encode(tokenizer, PROBE)
    for source in (tmp_path / "pipeline" / "bert", tmp_path / "pipeline", bert):
        encoder = text_encoder_from_diffusers(source).eval()
        assert encoder.length == LENGTH and encoder.emb_dropout.p == 0.0
        assert (ours(encoder, ids, mask) - hidden(bert, ids, mask)).abs().max() < TOLERANCE
        assert torch.equal(encoder.to_logits.weight, bert.to_logits.weight)
        assert not encoder.to_logits.weight.requires_grad


def test_ours_to_ldmbert_and_back_is_exact(encoder):
    back = text_encoder_from_diffusers(text_encoder_to_diffusers(encoder), length=LENGTH)
    assert back.state_dict().keys() == encoder.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), encoder.state_dict().values()))
    headless = randomised(TransformerTextEncoder(**SETTINGS))
    bert = text_encoder_to_diffusers(headless)
    assert not bert.to_logits.weight.any()  # LDMBert always has a head: ours has none, so zeros
    again = text_encoder_from_diffusers(bert, length=LENGTH, include_logits_head=False)
    assert again.to_logits is None and all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), headless.state_dict().values()))


# --------------------------------------------------------------------------------------------- the original


# x-transformers' TransformerWrapper(attn_layers=Encoder(dim, depth=1)) as BERTEmbedder stores it, written out by
# hand from ldm/modules/x_transformer.py: layers.0 = [LayerNorm, Attention, Residual], layers.1 = [LayerNorm,
# FeedForward(net=Sequential(Sequential(Linear, GELU), Dropout, Linear)), Residual].
ORIGINAL_DEPTH_1 = {
    "token_emb.weight": (100, 64), "pos_emb.emb.weight": (LENGTH, 64),
    "attn_layers.layers.0.0.weight": (64,), "attn_layers.layers.0.0.bias": (64,),
    "attn_layers.layers.0.1.to_q.weight": (64, 64), "attn_layers.layers.0.1.to_k.weight": (64, 64),
    "attn_layers.layers.0.1.to_v.weight": (64, 64),
    "attn_layers.layers.0.1.to_out.weight": (64, 64), "attn_layers.layers.0.1.to_out.bias": (64,),
    "attn_layers.layers.1.0.weight": (64,), "attn_layers.layers.1.0.bias": (64,),
    "attn_layers.layers.1.1.net.0.0.weight": (256, 64), "attn_layers.layers.1.1.net.0.0.bias": (256,),
    "attn_layers.layers.1.1.net.2.weight": (64, 256), "attn_layers.layers.1.1.net.2.bias": (64,),
    "norm.weight": (64,), "norm.bias": (64,), "to_logits.weight": (100, 64), "to_logits.bias": (100,),
}


def test_original_names_are_x_transformers(encoder):
    shallow = TransformerTextEncoder(**{**SETTINGS, "depth": 1}, include_logits_head=True)
    state = text_encoder_to_original(shallow)
    expected = {ORIGINAL_PREFIX + key: shape for key, shape in ORIGINAL_DEPTH_1.items()}
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    deep = text_encoder_to_original(encoder, prefix="")
    assert torch.equal(deep["attn_layers.layers.3.1.net.2.weight"], encoder.blocks[1].ff.net[3].weight)
    assert torch.equal(deep["attn_layers.layers.2.0.bias"], encoder.blocks[1].attn_norm.bias)


def test_ours_to_original_and_back_is_exact(encoder, tokenizer):
    ids, mask = encode(tokenizer, PROBE)
    state = text_encoder_to_original(encoder)
    settings = {**SETTINGS, "include_logits_head": True}
    whole = {"state_dict": {**state, "model.diffusion_model.out.2.weight": torch.zeros(1)}, "epoch": 3}
    stripped = {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items()}
    for source in (state, whole, stripped):
        back = text_encoder_from_original(source, settings).eval()
        assert torch.equal(ours(back, ids, mask), ours(encoder, ids, mask))
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), encoder.state_dict().values()))


# ---------------------------------------------------------------------------------------------- tokenizer


def pipeline_call(hf, captions: list[str], length: int) -> tuple[Tensor, Tensor]:
    """As LDMTextToImagePipeline calls its tokenizer, at ``length`` instead of 77."""
    out = hf(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask.bool()


def test_transformers_tokenizer_gives_our_ids_and_mask(tokenizer):
    hf = tokenizer_to_transformers(tokenizer)
    ids, mask = encode(tokenizer, PROBE)
    hf_ids, hf_mask = pipeline_call(hf, PROBE, LENGTH)
    assert torch.equal(hf_ids, ids) and torch.equal(hf_mask, mask)
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id) == \
        (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id)
    assert hf.unk_token == "[UNK]" and hf.bos_token is None and hf.eos_token is None
    assert hf.model_max_length == LENGTH and hf.padding_side == "right"
    assert hf(PROBE[0]).keys() == {"input_ids", "attention_mask"}  # LDMBert takes no token_type_ids


def test_at_77_tokens_long_captions_are_not_cut_to_our_length(tokenizer):
    ids, _ = encode(tokenizer, PROBE)
    hf_ids, hf_mask = pipeline_call(tokenizer_to_transformers(tokenizer), PROBE, 77)
    fits = hf_mask.sum(dim=1) <= LENGTH
    assert torch.equal(hf_ids[fits, :LENGTH], ids[fits]) and not hf_ids[fits, LENGTH:].any()
    assert not fits.all() and (hf_mask[~fits].sum(dim=1) > LENGTH).all()


def test_saved_transformers_tokenizer_round_trips_offline(tokenizer, tmp_path):
    tokenizer_to_transformers(tokenizer).save_pretrained(tmp_path / "pipeline" / "tokenizer")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "pipeline" / "tokenizer", local_files_only=True)
    ids, mask = encode(tokenizer, PROBE)
    hf_ids, hf_mask = pipeline_call(loaded, PROBE, LENGTH)
    assert torch.equal(hf_ids, ids) and torch.equal(hf_mask, mask)
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "tokenizer", loaded):
        back = tokenizer_from_transformers(source)
        assert back.length == LENGTH and back.fingerprint == tokenizer.fingerprint  # the same serialisation
        assert all(torch.equal(a, b) for a, b in zip(encode(back, PROBE), (ids, mask)))


# ---------------------------------------------------------------------------------------------- bad input


def test_original_state_that_does_not_fit_is_one_line(encoder):
    state = text_encoder_to_original(encoder)
    settings = {**SETTINGS, "include_logits_head": True}
    missing = {k: v for k, v in state.items() if not k.endswith("layers.3.1.net.2.weight")}
    with pytest.raises(CheckpointError, match=r"missing \['attn_layers\.layers\.3\.1\.net\.2\.weight'\]") as error:
        text_encoder_from_original(missing, settings)
    one_line(error)
    with pytest.raises(CheckpointError, match=r"unexpected \['to_logits\.bias', 'to_logits\.weight'\]") as error:
        text_encoder_from_original(state, SETTINGS)  # the released model keeps its head: settings must say so
    one_line(error)
    wrong = {**state, ORIGINAL_PREFIX + "token_emb.weight": torch.zeros(99, 64)}
    with pytest.raises(CheckpointError, match=r"token_emb\.weight has shape \(99, 64\).*\(100, 64\)") as error:
        text_encoder_from_original(wrong, settings)
    one_line(error)
    with pytest.raises(ConfigError, match="n_embed") as error:
        text_encoder_from_original(state, {**settings, "n_embed": 64})
    one_line(error)


def test_ldmbert_that_ours_cannot_be_is_one_line(tmp_path):
    bert = tiny_ldmbert()
    for change, match in (({"activation_function": "gelu_new"}, "activation_function 'gelu_new'"),
                          ({"encoder_ffn_dim": 100}, "encoder_ffn_dim 100 is not a whole multiple"),
                          ({"attention_dropout": 0.1}, "attention_dropout 0.1 differs")):
        odd = LDMBertModel(LDMBertConfig(**{**bert.config.to_dict(), **change}))
        with pytest.raises(ConfigError, match=match) as error:
            text_encoder_from_diffusers(odd)
        one_line(error)
    with pytest.raises(ConfigError, match="length 9 must be between 2 and max_position_embeddings 8") as error:
        text_encoder_from_diffusers(bert, length=9)
    one_line(error)
    with pytest.raises(CheckpointError, match="no LDMBertModel here") as error:
        text_encoder_from_diffusers(tmp_path)
    one_line(error)


def test_ldmbert_folder_with_a_missing_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_ldmbert().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.fc2.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.fc2.weight") as error:  # not left random
        text_encoder_from_diffusers(tmp_path)
    one_line(error)


def test_tokenizer_that_ours_cannot_be_is_one_line(tokenizer):
    hf = tokenizer_to_transformers(tokenizer)
    hf.padding_side = "left"
    with pytest.raises(ConfigError, match="padding_side 'left'") as error:
        tokenizer_from_transformers(hf)
    one_line(error)
    hf.padding_side, hf.model_max_length = "right", int(1e30)
    with pytest.raises(ConfigError, match="no model_max_length: pass length=") as error:
        tokenizer_from_transformers(hf)
    one_line(error)
    assert tokenizer_from_transformers(hf, length=5).length == 5


def test_missing_optional_packages_say_what_to_install(monkeypatch, encoder, tokenizer):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"needs transformers: pip install \"lightning_ldm\[diffusers\]\""):
        tokenizer_to_transformers(tokenizer)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ConfigError, match=r"diffusers\" extra: pip install \"lightning_ldm\[diffusers\]\""):
        text_encoder_to_diffusers(encoder)
