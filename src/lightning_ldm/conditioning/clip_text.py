"""A frozen pretrained CLIP text tower read from a local folder, as Stable Diffusion conditions on text.

The folder is either a Hugging Face model folder holding both the text model and its tokenizer, or a diffusers
pipeline folder with ``text_encoder/`` and ``tokenizer/`` subfolders. Nothing is downloaded.

Captions are padded to ``length`` tokens with the tokenizer's pad token and encoded without an attention mask,
as Stable Diffusion does: CLIP's causal mask already keeps the real tokens from seeing the padding, and the
UNet cross-attends to all ``length`` rows.

``layer``:

- ``"last"``: the last layer's hidden states after the final LayerNorm (``last_hidden_state``), Stable
  Diffusion 1.x;
- ``"penultimate"``: the hidden states before the last layer, followed by the final LayerNorm. This is Stable
  Diffusion 2's ``FrozenOpenCLIPEmbedder(layer="penultimate")``, which stops one residual block early and then
  applies ``ln_final``, and diffusers' ``clip_skip=1``. (SDXL reads the same layer without the norm.)
"""

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from lightning_ldm.errors import ConfigError

LAYERS = ("last", "penultimate")
MODEL_FILES = "config.json and weights (model.safetensors, pytorch_model.bin, or their sharded index)"
TOKENIZER_FILES = "tokenizer.json, or vocab.json and merges.txt"
_SAMPLE_BYTES = 1 << 20


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('a CLIP text tower needs the "clip" extra (transformers): '
                          'pip install "lightning_ldm[clip]"') from None
    return transformers


def _weight_files(folder: Path) -> list[Path]:
    names = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return sorted({f for pattern in names for f in folder.glob(pattern) if f.is_file()})


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and
                                                     (folder / "merges.txt").is_file())


def resolve_folders(path: str | Path) -> tuple[Path, Path]:
    """The text model's and the tokenizer's folders under ``path``: the folder itself, or the diffusers
    layout's ``text_encoder/`` and ``tokenizer/``. One line naming what is missing otherwise."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"CLIP text tower path {root} is not a folder; expected a model folder with "
                          f"{MODEL_FILES} and {TOKENIZER_FILES}, or a diffusers folder with text_encoder/ and "
                          "tokenizer/")
    if (root / "text_encoder").is_dir():
        model_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
    else:
        model_dir = tokenizer_dir = root
    if not (model_dir / "config.json").is_file() or not _weight_files(model_dir):
        raise ConfigError(f"CLIP text tower folder {model_dir} is incomplete: expected {MODEL_FILES}")
    if not _has_tokenizer(tokenizer_dir):
        raise ConfigError(f"CLIP text tower folder {tokenizer_dir} has no tokenizer: expected {TOKENIZER_FILES}")
    return model_dir, tokenizer_dir


def folder_fingerprint(model_dir: Path, tokenizer_dir: Path, *extra: object) -> str:
    """Identity of a pretrained tower for caches: its config and tokenizer files whole, and each weights file's
    name, size and three 1 MiB samples (start, middle, end), which any fine-tune changes; reading every byte of
    a half-gigabyte file on each start would cost more than it protects."""
    digest = hashlib.sha256()
    for part in extra:
        digest.update(repr(part).encode() + b"\0")
    small = [model_dir / "config.json"] + sorted(f for f in tokenizer_dir.iterdir()
                                                 if f.is_file() and f.suffix in (".json", ".txt"))
    for file in small:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    for file in _weight_files(model_dir):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


class CLIPTextTower(nn.Module):
    """Frozen: no parameter takes gradients and the model stays in eval mode (``train()`` keeps it there)."""

    def __init__(self, path: str | Path, *, length: int = 77, layer: str = "last") -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ConfigError(f"CLIP text tower layer must be one of {', '.join(LAYERS)}, got {layer!r}")
        transformers = _import_transformers()
        model_dir, tokenizer_dir = resolve_folders(path)
        self.path, self.length, self.layer = str(path), int(length), layer
        try:
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
            model = transformers.CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"CLIP text tower at {path} could not be loaded: {first_line}") from None
        # float32 whatever the stored dtype: the tower runs once per caption and its output feeds the UNet's
        # own precision policy
        self.model = model.to(torch.float32)
        positions = self.model.config.max_position_embeddings
        if not 2 <= self.length <= positions:
            raise ConfigError(f"CLIP text tower length {self.length} must be in [2, {positions}] (the model's "
                              "max_position_embeddings)")
        self.requires_grad_(False)
        self.train(False)
        self.fingerprint = folder_fingerprint(model_dir, tokenizer_dir, self.length, self.layer)

    def train(self, mode: bool = True) -> "CLIPTextTower":
        return super().train(False)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids (B, length): [BOS] caption [EOS], padded with the tokenizer's pad token, cut to length."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of captions, not one string")
        batch = self.tokenizer([str(t) for t in texts], padding="max_length", max_length=self.length,
                               truncation=True, return_tensors="pt")
        return batch["input_ids"]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """Hidden states (B, length, dim) of the chosen layer."""
        device = next(self.model.parameters()).device if device is None else torch.device(device)
        ids = self.tokenize(texts).to(device)
        if self.layer == "last":
            return self.model(input_ids=ids).last_hidden_state
        hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        return self._final_norm(hidden)

    @property
    def _final_norm(self) -> nn.Module:
        # transformers 4 nests the transformer under ``text_model``; 5 puts its parts on the model itself
        return getattr(self.model, "text_model", self.model).final_layer_norm

    def extra_repr(self) -> str:
        return f"path={self.path!r}, length={self.length}, layer={self.layer!r}, fingerprint={self.fingerprint}"
