"""Embedders: each maps one condition y of a batch to what the UNet consumes, tau_theta(y) of the paper (Eq. 3).

An embedder declares the batch key it reads (``input_key``), what it produces (``output``: a ``vector`` added
to the time embedding, a ``context`` token sequence for cross-attention, or a ``concat`` map joined to z_t),
whether it trains with the UNet, its own drop rate for classifier-free guidance, and its null condition (the
null class, the empty caption). A trained embedder drops by replacing the *input* (label, token ids) by the null
input on the device, so the unconditional branch is exactly what sampling feeds for guidance and no step waits
for the host; a frozen one replaces its output by the null output, which is the same thing for a fixed function.
"""

import copy
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_ldm.errors import ConfigError, DataError

Output = Literal["vector", "context", "concat"]


class Embedder(nn.Module):
    kind: str
    output: Output
    input_key: str

    def __init__(self, *, drop_rate: float) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"an embedder's drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate = drop_rate

    # Whether classifier-free guidance's unconditional branch keeps this condition (a map: the image to
    # super-resolve or inpaint) instead of its null, as Stable Diffusion's inpainting and upscaling models do.
    guidance_keeps_input = False

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The batch keys it reads; with more than one, it gets a mapping of them."""
        return (self.input_key,)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def pairs(self):
        """What the data must add to each item for this condition (``lightning_ldm.data.pairs``), or None."""
        return None

    @property
    def dim(self) -> int:
        """Width of the output: the vector's size, the context's feature width, or the map's channels."""
        raise NotImplementedError

    @property
    def spec(self) -> dict[str, Any]:
        """The config that rebuilds this embedder (without weights), stored in checkpoints."""
        raise NotImplementedError

    def prepare(self, datamodule, *, progress: bool = True) -> None:
        """Anything learned from the data before training (a tokenizer); nothing by default."""

    def share_state(self, other: "Embedder") -> None:
        """Take over non-tensor state (a tokenizer) from the trained copy, for the EMA copy."""

    def null_values(self, n: int) -> Any:
        """The null input for n items (what the unconditional branch of guidance reads)."""
        raise NotImplementedError

    def check_batch(self, values: Any) -> None:
        """One clear line when the data does not carry this condition."""

    def cache_identity(self) -> Optional[dict[str, Any]]:
        """What ``encode_for_cache`` depends on (its key in the latent cache); None: inputs are not cached."""
        return None

    def encode_for_cache(self, values: Sequence[Any], device: torch.device) -> dict[str, Tensor]:
        """The stored form of ``values``, on the CPU; ``forward`` takes a batch of it (a mapping of tensors) in
        place of the raw values."""
        raise NotImplementedError

    def forward(self, values: Any, device: torch.device, dropped: Optional[Tensor] = None) -> Tensor:
        """The embedding of ``values``; items where ``dropped`` (bool (B,) on ``device``) holds get the null
        condition's."""
        raise NotImplementedError


class ClassEmbedder(Embedder):
    """A learned table of class embeddings with one extra row, the null class (index ``num_classes``).

    ``output="vector"`` is ADM's class embedding added to the time embedding (LDM's conditioning_key "adm"); its
    width must then be the UNet's time-embedding width, which the module fills in. ``output="context"`` is LDM's
    ClassEmbedder: one token of width ``dim`` to attend to (conditioning_key "crossattn")."""

    kind = "class"

    def __init__(self, *, num_classes: int, dim: int, output: Output = "vector", drop_rate: float = 0.1,
                 input_key: str = "label") -> None:
        super().__init__(drop_rate=drop_rate)
        self._checked_a_batch = False
        if num_classes < 1:
            raise ConfigError(f"the class embedder needs num_classes >= 1 (the classes of the data), got {num_classes}")
        if output not in ("vector", "context"):
            raise ConfigError(f"a class embedder produces a vector or a context, not {output!r}")
        self.num_classes, self.output, self.input_key = num_classes, output, input_key
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def dim(self) -> int:
        return self.table.embedding_dim

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "dim": self.dim, "output": self.output,
                "drop_rate": self.drop_rate, "input_key": self.input_key}

    def null_values(self, n: int) -> Tensor:
        return torch.full((n,), self.null_class, dtype=torch.long)

    def check_batch(self, values: Tensor) -> None:
        # The first batch only: reading the labels' range waits for the device, which no step should do; the
        # datamodule's class count is checked against num_classes at setup.
        if self._checked_a_batch:
            return
        self._checked_a_batch = True
        if values.numel() and (int(values.min()) < 0 or int(values.max()) > self.null_class):
            raise DataError(f"class labels run from {int(values.min())} to {int(values.max())}, but the class "
                            f"embedder has {self.num_classes} classes (and the null class {self.null_class})")

    def forward(self, values: Tensor, device: torch.device, dropped: Optional[Tensor] = None) -> Tensor:
        labels = values.to(device=device, dtype=torch.long, non_blocking=True)
        if dropped is not None:
            labels = torch.where(dropped, self.null_class, labels)
        embedding = self.table(labels)
        return embedding if self.output == "vector" else embedding[:, None, :]


class CaptionEmbedder(Embedder):
    """The paper's text-to-image recipe: a transformer trained jointly from scratch with the UNet (LDM's
    BERTEmbedder, ``cond_stage_trainable``), on token ids from a WordPiece tokenizer trained on the dataset's
    captions before the first step. The tokenizer travels in the state dict (``get_extra_state``), so a
    checkpoint or export alone can tokenize prompts. Captions are padded to a fixed length with an attention
    mask: the shapes never change, for torch.compile and CUDA graphs."""

    kind = "text"
    output: Output = "context"

    def __init__(self, *, vocab_size: int = 1000, length: int = 16, dim: int = 256, depth: int = 4,
                 heads: int = 8, dim_head: int = 64, ff_mult: int = 4, dropout: float = 0.0,
                 include_logits_head: bool = False, drop_rate: float = 0.1, input_key: str = "caption") -> None:
        super().__init__(drop_rate=drop_rate)
        from lightning_ldm.conditioning.text_encoder import TransformerTextEncoder

        self.input_key = input_key
        self.settings = dict(vocab_size=vocab_size, length=length, dim=dim, depth=depth, heads=heads,
                             dim_head=dim_head, ff_mult=ff_mult, dropout=dropout,
                             include_logits_head=include_logits_head)
        self.encoder = TransformerTextEncoder(**self.settings)
        self.tokenizer = None  # trained by prepare(), or restored by set_extra_state()

    @property
    def dim(self) -> int:
        return self.settings["dim"]

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.settings, "drop_rate": self.drop_rate, "input_key": self.input_key}

    def prepare(self, datamodule, *, progress: bool = True) -> None:
        from lightning_ldm.conditioning.tokenizer import CaptionTokenizer

        if self.tokenizer is not None:
            return  # restored from a checkpoint: the ids the encoder learned must keep their meaning
        self.tokenizer = CaptionTokenizer.train(datamodule.training_captions(), vocab_size=self.settings["vocab_size"],
                                                length=self.settings["length"], progress=progress)
        if self.tokenizer.vocab_size > self.settings["vocab_size"]:
            raise ConfigError(f"the trained tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                              f"encoder's vocab_size {self.settings['vocab_size']}")

    def share_state(self, other: "Embedder") -> None:
        self.tokenizer = getattr(other, "tokenizer", None)

    def null_values(self, n: int) -> list[str]:
        return [""] * n

    def check_batch(self, values: Any) -> None:
        if isinstance(values, Mapping):  # captions encoded in the latent cache
            return
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise DataError(f"text conditioning reads captions (a list of strings) from the batch's "
                            f"{self.input_key!r}, got {type(values).__name__}")

    def cache_identity(self) -> Optional[dict[str, Any]]:
        return {"kind": "token_ids", "tokenizer": self._tokenizer().fingerprint}

    def encode_for_cache(self, values: Sequence[str], device: torch.device) -> dict[str, Tensor]:
        ids, mask = self._tokenizer().encode(list(values))
        return {"ids": ids.to(torch.int32), "mask": mask}

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError("the caption embedder has no tokenizer: it is trained on the data's captions when "
                              "training starts, or restored from a checkpoint")
        return self.tokenizer

    def forward(self, values: Union[Sequence[str], Mapping[str, Tensor]], device: torch.device,
                dropped: Optional[Tensor] = None) -> Tensor:
        if isinstance(values, Mapping):  # cached as int32: half the bytes to copy, widened on the device
            ids, mask = values["ids"], values["mask"]
        else:
            ids, mask = self._tokenizer().encode(list(values))
        ids, mask = ids.to(device, non_blocking=True).long(), mask.to(device, non_blocking=True).bool()
        if dropped is not None:
            null_ids, null_mask = self._null_tokens(device)
            ids = torch.where(dropped[:, None], null_ids, ids)
            mask = torch.where(dropped[:, None], null_mask, mask)
        return self.encoder(ids, mask)

    def _null_tokens(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The empty caption's ids and mask on ``device``: tokenized and copied once per tokenizer, not per step."""
        key = (self.tokenizer.fingerprint, str(device))
        if getattr(self, "_null_cache", (None,))[0] != key:
            ids, mask = self.tokenizer.encode([""])
            self._null_cache = (key, ids.to(device), mask.to(device))
        return self._null_cache[1], self._null_cache[2]

    def get_extra_state(self) -> dict:
        return {"tokenizer": None if self.tokenizer is None else self.tokenizer.to_str()}

    def set_extra_state(self, state: dict) -> None:
        from lightning_ldm.conditioning.tokenizer import CaptionTokenizer

        text = (state or {}).get("tokenizer")
        if text is None:
            return
        restored = CaptionTokenizer.from_str(text)
        if self.tokenizer is not None and self.tokenizer.fingerprint != restored.fingerprint:
            raise ConfigError(f"the checkpoint's tokenizer ({restored.fingerprint}) differs from this model's "
                              f"({self.tokenizer.fingerprint}): token ids would change meaning")
        self.tokenizer = restored


class _Shared:
    """Holds a frozen model outside the module tree: not deep-copied into the EMA, not in the state dict (its
    weights live at its path), moved to the device on first use."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __deepcopy__(self, memo) -> "_Shared":
        return self


class FrozenCLIPTextEmbedder(Embedder):
    """A frozen pretrained text encoder loaded from a local path, as Stable Diffusion uses CLIP's text tower.
    Its weights are not copied into checkpoints: they are read from ``path`` again when a model is rebuilt."""

    kind = "clip_text"
    output: Output = "context"

    def __init__(self, *, path: str, length: int = 77, layer: str = "last", drop_rate: float = 0.1,
                 input_key: str = "caption") -> None:
        super().__init__(drop_rate=drop_rate)
        from lightning_ldm.conditioning.clip_text import CLIPTextTower

        self.input_key, self.path, self.length, self.layer = input_key, path, length, layer
        self._tower = _Shared(CLIPTextTower(path, length=length, layer=layer))

    @property
    def trainable(self) -> bool:
        return False

    @property
    def dim(self) -> int:
        return self._tower.model.dim

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "length": self.length, "layer": self.layer,
                "drop_rate": self.drop_rate, "input_key": self.input_key}

    null_values = CaptionEmbedder.null_values
    check_batch = CaptionEmbedder.check_batch

    def cache_identity(self) -> Optional[dict[str, Any]]:
        return {"kind": "clip_text", "tower": self._tower.model.fingerprint}

    def encode_for_cache(self, values: Sequence[str], device: torch.device) -> dict[str, Tensor]:
        return {"context": self._on(device).encode(list(values), device).half().cpu()}

    def _on(self, device: torch.device):
        tower = self._tower.model
        if next(tower.parameters()).device != torch.device(device):
            tower.to(device)
        return tower

    @torch.no_grad()
    def forward(self, values: Union[Sequence[str], Mapping[str, Tensor]], device: torch.device,
                dropped: Optional[Tensor] = None) -> Tensor:
        tower = self._on(device)
        if isinstance(values, Mapping):  # the tower's outputs, stored as float16 in the latent cache
            out = values["context"].to(device=device, dtype=torch.float32, non_blocking=True)
        else:
            out = tower.encode(list(values), device)
        if dropped is not None:
            out = torch.where(dropped[:, None, None], self._null_output(device), out)
        return out

    def _null_output(self, device: torch.device) -> Tensor:
        """The empty caption's encoding, computed once per device."""
        key = str(device)
        if getattr(self, "_null_cache", (None,))[0] != key:
            self._null_cache = (key, self._on(device).encode([""], device))
        return self._null_cache[1]


def embedder_kinds() -> dict[str, type[Embedder]]:
    from lightning_ldm.conditioning.image_embedders import LowResolutionEmbedder, MaskedImageEmbedder

    return {"class": ClassEmbedder, "text": CaptionEmbedder, "clip_text": FrozenCLIPTextEmbedder,
            "low_res": LowResolutionEmbedder, "inpainting": MaskedImageEmbedder}


def build_embedder(spec: dict[str, Any]) -> Embedder:
    spec = copy.deepcopy(dict(spec))
    kind = spec.pop("kind", None)
    EMBEDDERS = embedder_kinds()
    if kind not in EMBEDDERS:
        raise ConfigError(f"conditioning embedder kind {kind!r} is unknown; use one of {', '.join(EMBEDDERS)}")
    try:
        return EMBEDDERS[kind](**spec)
    except TypeError as error:
        raise ConfigError(f"conditioning embedder {kind!r}: {error}") from None

