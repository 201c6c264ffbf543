"""The text side of text-to-image conditioning: the caption tokenizer, the paper's jointly trained transformer
text encoder, and the frozen CLIP text tower read from a local folder."""

import json
import os
import string
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from lightning_ldm.conditioning.text_encoder import PAPER_TXT2IMG, PAPER_TXT2IMG_PARAMETERS, TransformerTextEncoder
from lightning_ldm.conditioning.tokenizer import CaptionTokenizer, learn_vocabulary
from lightning_ldm.errors import ConfigError

SUBJECTS = ["a dog", "two cats", "a red car", "an old man", "a small boat", "the Café", "a bird", "three horses",
            "a green apple", "a child"]
PLACES = ["on a sofa.", "in the snow", "near the river, at night", "under a tree!", "on the beach"]
CAPTIONS = [f"{s} {p}" for s in SUBJECTS for p in PLACES]  # 50 captions
LENGTH = 16


def normalise(text: str) -> str:
    """BERT's normaliser: NFD, strip accents, lowercase."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn").lower()


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=200, length=LENGTH, progress=False)


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_fixed_length(tokenizer):
    assert 4 < tokenizer.vocab_size <= 200 and tokenizer.length == LENGTH and tokenizer.pad_id == 0
    ids, mask = tokenizer.encode(CAPTIONS)
    assert ids.shape == mask.shape == (len(CAPTIONS), LENGTH)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert tokenizer.decode(ids) == [normalise(c) for c in CAPTIONS]


def test_tokenizer_mask_marks_exactly_the_real_tokens(tokenizer):
    texts = ["a dog on the beach", "two cats", "a [PAD] and a [SEP]"]  # special tokens as text stay text
    ids, mask = tokenizer.encode(texts)
    lengths = mask.sum(dim=1)
    for row, n in enumerate(lengths.tolist()):
        assert mask[row, :n].all() and not mask[row, n:].any()  # real tokens first, then padding only
        assert ids[row, 0] == tokenizer.cls_id and ids[row, n - 1] == tokenizer.sep_id
        assert (ids[row, n:] == tokenizer.pad_id).all()
        assert not (ids[row, 1 : n - 1] == tokenizer.pad_id).any()
        assert not (ids[row, 1 : n - 1] == tokenizer.sep_id).any()
    assert lengths.tolist()[:2] == [len("a dog on the beach".split()) + 2, 4]


def test_empty_caption_is_cls_sep_and_padding(tokenizer):
    ids, mask = tokenizer.encode(["", "a dog"])
    assert ids[0, :2].tolist() == [tokenizer.cls_id, tokenizer.sep_id]
    assert (ids[0, 2:] == tokenizer.pad_id).all()
    assert mask[0].tolist() == [True, True] + [False] * (LENGTH - 2)
    assert tokenizer.decode(ids[:1]) == [""]


def test_truncation_keeps_sep_and_warns_once():
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=200, length=LENGTH, progress=False)
    long = " ".join(["a dog"] * 20)  # 40 words
    with pytest.warns(UserWarning, match=r"42 tokens.*caption length 16.*raise") as record:
        ids, mask = tok.encode([long, "a dog"])
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert mask[0].all() and ids[0, -1] == tok.sep_id and ids[0, 0] == tok.cls_id
    assert tok.decode(ids[:1]) == [" ".join(["a dog"] * 7)]  # 14 words between [CLS] and [SEP]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode([long])  # said once per tokenizer


def test_serialisation_round_trip_and_fingerprint(tokenizer):
    text = tokenizer.to_str()
    restored = CaptionTokenizer.from_str(text)
    assert restored.to_str() == text and restored.fingerprint == tokenizer.fingerprint
    assert restored.length == LENGTH and json.loads(text)["length"] == LENGTH
    probe = CAPTIONS[::7] + ["", "an unseen word: zebra", "a [PAD] dog"]
    for a, b in zip(tokenizer.encode(probe), restored.encode(probe)):
        assert torch.equal(a, b)
    other = CaptionTokenizer.train([c.upper() + " at dawn" for c in CAPTIONS[:30]], vocab_size=200, length=LENGTH,
                                   progress=False)
    assert other.fingerprint != tokenizer.fingerprint
    longer = CaptionTokenizer.train(CAPTIONS, vocab_size=200, length=LENGTH + 1, progress=False)
    assert longer.fingerprint != tokenizer.fingerprint  # the length changes the ids' shape
    assert len(tokenizer.fingerprint) == 16 and int(tokenizer.fingerprint, 16) >= 0
    with pytest.raises(ValueError, match="not a serialised caption tokenizer"):
        CaptionTokenizer.from_str(json.dumps({"model": {}}))


def test_training_is_deterministic_across_processes(tokenizer, tmp_path):
    """Every rank of a run trains its own tokenizer: the ids must not depend on the process (hash seeds)."""
    again = CaptionTokenizer.train(CAPTIONS, vocab_size=200, length=LENGTH, progress=False)
    assert again.to_str() == tokenizer.to_str()
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from test_text_encoders import CAPTIONS, LENGTH; "
              "from lightning_ldm.conditioning.tokenizer import CaptionTokenizer; "
              "print(CaptionTokenizer.train(CAPTIONS, vocab_size=200, length=LENGTH, progress=False).fingerprint)")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == tokenizer.fingerprint


def test_vocabulary_is_learned_by_frequency():
    # "##l" + "##l" (3 occurrences x 2 pairs) beats every other pair; ties go to the pair that sorts first
    vocab = learn_vocabulary({"hello": 3, "ball": 1, "bell": 1}, vocab_size=100)
    specials, rest = vocab[:4], vocab[4:]
    assert specials == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    alphabet = sorted({"h", "b", "##e", "##l", "##o", "##a"})
    assert rest[: len(alphabet)] == alphabet and rest[len(alphabet)] == "##ll"
    assert {"hello", "ball", "bell"} <= set(rest)
    assert len(learn_vocabulary({"hello": 3, "ball": 1, "bell": 1}, vocab_size=len(vocab) - 2)) == len(vocab) - 2


# ------------------------------------------------------------------------------------------------ encoder


def tiny_encoder(tokenizer, **kwargs) -> TransformerTextEncoder:
    torch.manual_seed(0)
    settings = dict(vocab_size=tokenizer.vocab_size, length=LENGTH, dim=32, depth=2, heads=2, dim_head=8)
    return TransformerTextEncoder(**{**settings, **kwargs})


def test_encoder_shapes_and_padding_has_no_influence(tokenizer):
    encoder = tiny_encoder(tokenizer).eval()
    ids, mask = tokenizer.encode(["a dog on the beach", "two cats", ""])
    out = encoder(ids, mask)
    assert out.shape == (3, LENGTH, 32) and torch.isfinite(out).all()
    changed = torch.where(mask, ids, torch.randint_like(ids, 4, tokenizer.vocab_size))
    changed_out = encoder(changed, mask)
    assert torch.allclose(out[mask], changed_out[mask], atol=1e-6)
    assert not torch.allclose(out[~mask], changed_out[~mask])  # padded rows are read by cross-attention too
    # a row whose keys are all masked attends to every key rather than producing NaN
    assert torch.isfinite(encoder(ids, torch.zeros_like(mask))).all()


def test_gradient_reaches_every_parameter(tokenizer):
    encoder = tiny_encoder(tokenizer, dropout=0.1).train()
    ids, mask = tokenizer.encode(CAPTIONS[:4])
    encoder(ids, mask).square().mean().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_logits_head_is_optional_and_unused(tokenizer):
    count = lambda m: sum(p.numel() for p in m.parameters())
    plain, headed = tiny_encoder(tokenizer), tiny_encoder(tokenizer, include_logits_head=True)
    assert plain.to_logits is None
    assert count(headed) - count(plain) == 32 * tokenizer.vocab_size + tokenizer.vocab_size
    headed.load_state_dict(plain.state_dict(), strict=False)  # all but the head
    ids, mask = tokenizer.encode(["a dog"])
    assert torch.equal(plain(ids, mask), headed(ids, mask))  # the head takes no part


def test_paper_preset_has_the_released_parameter_count():
    """txt2img-1p4B's BERTEmbedder, counted from ldm/modules/x_transformer.py: TransformerWrapper(num_tokens=30522,
    max_seq_len=77, attn_layers=Encoder(dim=1280, depth=32)) with the library's defaults."""
    vocab, length, dim, depth, inner, ff = 30522, 77, 1280, 32, 8 * 64, 4 * 1280
    layer_norm = 2 * dim
    attention = layer_norm + 3 * dim * inner + (inner * dim + dim)  # bias-free q, k, v; biased to_out
    feed_forward = layer_norm + (dim * ff + ff) + (ff * dim + dim)
    without_head = vocab * dim + length * dim + depth * (attention + feed_forward) + layer_norm
    released = without_head + dim * vocab + vocab  # TransformerWrapper always builds to_logits
    assert (attention + feed_forward, without_head, released) == (15_741_440, 542_895_360, 581_994_042)
    assert PAPER_TXT2IMG_PARAMETERS == released
    with torch.device("meta"):
        paper = TransformerTextEncoder(**PAPER_TXT2IMG)
        headless = TransformerTextEncoder(**{**PAPER_TXT2IMG, "include_logits_head": False})
    assert sum(p.numel() for p in paper.parameters()) == released
    assert sum(p.numel() for p in headless.parameters()) == without_head


def test_encoder_compiles_in_one_graph(tokenizer):
    torch._dynamo.reset()
    encoder = tiny_encoder(tokenizer).eval()
    ids, mask = tokenizer.encode(["a dog on the beach", ""])
    counter = CompileCounter()  # traces with dynamo, runs the graph eagerly: fullgraph=True raises on a break
    compiled = torch.compile(encoder, backend=counter, fullgraph=True)
    try:
        assert torch.allclose(compiled(ids, mask), encoder(ids, mask), atol=1e-6)
        ids2, mask2 = tokenizer.encode(["two cats", "a red car in the snow"])
        compiled(ids2, mask2)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------- CLIP

CLIP_VOCAB = (["!", ".", ","] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase] +
              ["!</w>", ".</w>", ",</w>", "th", "the</w>", "do", "dog</w>"] + ["<|startoftext|>", "<|endoftext|>"])
CLIP_MERGES = ["t h", "th e</w>", "d o", "do g</w>"]


def write_clip_tokenizer_files(folder) -> None:
    """The slow files of a CLIP BPE tokenizer: vocab.json and merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(CLIP_VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n")


def tiny_clip(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=len(CLIP_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=CLIP_VOCAB.index("<|startoftext|>"),
        eos_token_id=CLIP_VOCAB.index("<|endoftext|>"), pad_token_id=CLIP_VOCAB.index("<|endoftext|>"))
    torch.manual_seed(seed)
    return transformers.CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """One tiny model in both layouts: a flat folder (model and vocab.json/merges.txt side by side) and a
    diffusers folder (text_encoder/, tokenizer/ saved by the tokenizer itself)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("clip")
    model = tiny_clip()
    flat, pipeline = root / "flat", root / "pipeline"
    model.save_pretrained(flat)
    write_clip_tokenizer_files(flat)
    model.save_pretrained(pipeline / "text_encoder")
    transformers.CLIPTokenizer.from_pretrained(str(flat)).save_pretrained(pipeline / "tokenizer")
    return model, flat, pipeline


def reference(model, folder, texts, layer: str) -> torch.Tensor:
    import transformers

    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        final_norm = getattr(model, "text_model", model).final_layer_norm
        return out.last_hidden_state if layer == "last" else final_norm(out.hidden_states[-2])


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_clip_tower_matches_the_model_in_both_layouts(clip_folders, layer):
    from lightning_ldm.conditioning.clip_text import CLIPTextTower

    model, flat, pipeline = clip_folders
    texts = ["the dog.", "a cat, the dog!", ""]
    expected = reference(model, flat, texts, layer)
    for folder in (flat, pipeline):
        tower = CLIPTextTower(folder, layer=layer)
        out = tower.encode(texts, "cpu")
        assert out.shape == (3, 77, 32) and tower.dim == 32
        assert torch.equal(out, expected)
        assert torch.equal(tower.encode(texts, "cpu"), out)  # deterministic
    assert not torch.allclose(reference(model, flat, texts, "last"), reference(model, flat, texts, "penultimate"))


def test_clip_tower_is_frozen(clip_folders):
    from lightning_ldm.conditioning.clip_text import CLIPTextTower

    tower = CLIPTextTower(clip_folders[1], length=8)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())
    out = tower.encode(["the dog"], "cpu")
    assert out.shape == (1, 8, 32) and not out.requires_grad


def test_clip_fingerprint_follows_weights_and_settings(clip_folders, tmp_path):
    from lightning_ldm.conditioning.clip_text import CLIPTextTower

    _, flat, pipeline = clip_folders
    base = CLIPTextTower(flat)
    assert CLIPTextTower(flat).fingerprint == base.fingerprint
    assert CLIPTextTower(flat, layer="penultimate").fingerprint != base.fingerprint
    assert CLIPTextTower(flat, length=20).fingerprint != base.fingerprint
    other = tmp_path / "other"
    tiny_clip(seed=1).save_pretrained(other)
    write_clip_tokenizer_files(other)
    assert CLIPTextTower(other).fingerprint != base.fingerprint


def one_line_error(match: str, *args, **kwargs) -> str:
    from lightning_ldm.conditioning.clip_text import CLIPTextTower

    with pytest.raises(ConfigError, match=match) as error:
        CLIPTextTower(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_clip_errors_are_one_line(clip_folders, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    _, flat, _ = clip_folders
    missing = tmp_path / "nowhere"
    assert str(missing) in one_line_error("not a folder", missing)
    no_tokenizer = tmp_path / "no_tokenizer"
    tiny_clip().save_pretrained(no_tokenizer)
    assert "tokenizer.json, or vocab.json and merges.txt" in one_line_error("has no tokenizer", no_tokenizer)
    no_weights = tmp_path / "no_weights"
    write_clip_tokenizer_files(no_weights)
    (no_weights / "config.json").write_text((flat / "config.json").read_text())
    assert "config.json and weights" in one_line_error(f"{no_weights} is incomplete", no_weights)
    one_line_error("layer must be one of last, penultimate", flat, layer="first")
    one_line_error(r"length 78 must be in \[2, 77\]", flat, length=78)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    one_line_error(r'pip install "lightning_ldm\[clip\]"', flat)
