"""The conditioner: one home for every condition of stage 2 (in the spirit of generative-models'
GeneralConditioner). It holds named embedders and turns a batch into the UNet's keyword inputs, so the loss
and every sampler call the network as ``net(z_t, t, **cond)``:

- ``vector`` (B, D): the sum of the vector embedders' outputs, added to the time embedding;
- ``context`` (B, L, D): the context embedders' token sequences joined along the sequence (a class token and
  a caption's tokens attend side by side, so their widths must agree);
- ``concat`` (B, C, h, w): the map embedders' outputs joined along channels.

Classifier-free guidance works on these outputs: ``guidance_inputs`` gives the conditional and the null
conditions joined into one doubled batch.
"""

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_ldm.conditioning.embedders import Embedder, build_embedder
from lightning_ldm.errors import ConfigError, DataError

Cond = dict[str, Tensor]


class Conditioner(nn.Module):
    def __init__(self, embedders: Mapping[str, Embedder]) -> None:
        super().__init__()
        self.embedders = nn.ModuleDict(dict(embedders))
        widths = {e.dim for e in self.embedders.values() if e.output == "context"}
        if len(widths) > 1:
            raise ConfigError(f"the context embedders produce widths {sorted(widths)}; cross-attention needs one "
                              "width (set the embedders' dim alike)")
        vectors = {e.dim for e in self.embedders.values() if e.output == "vector"}
        if len(vectors) > 1:
            raise ConfigError(f"the vector embedders produce sizes {sorted(vectors)}; they are summed, so they must agree")

    @classmethod
    def from_spec(cls, spec: Optional[Mapping[str, Mapping[str, Any]]], *, vector_dim: int,
                  first_stage=None) -> "Conditioner":
        """Embedders from their configs (``conditioning=`` group). A vector embedder without a ``dim`` gets
        ``vector_dim``: the UNet's time-embedding width, which it is added to. Map embedders (super-resolution,
        inpainting) are bound to ``first_stage``, whose latents they join."""
        embedders = {}
        for name, embedder_spec in (spec or {}).items():
            embedder_spec = dict(embedder_spec)
            if embedder_spec.get("output", "vector") == "vector" and embedder_spec.get("kind") == "class":
                embedder_spec["dim"] = embedder_spec.get("dim") or vector_dim
            embedders[name] = build_embedder(embedder_spec)
            if hasattr(embedders[name], "bind_first_stage"):
                if first_stage is None:
                    raise ConfigError(f"conditioning {name!r} ({embedders[name].kind}) needs the first stage")
                embedders[name].bind_first_stage(first_stage)
        return cls(embedders)

    # ----------------------------------------------------------------------------------- what it provides
    @property
    def spec(self) -> dict[str, dict[str, Any]]:
        return {name: embedder.spec for name, embedder in self.embedders.items()}

    @property
    def context_dim(self) -> Optional[int]:
        return next((e.dim for e in self.embedders.values() if e.output == "context"), None)

    @property
    def concat_channels(self) -> int:
        return sum(e.dim for e in self.embedders.values() if e.output == "concat")

    @property
    def vector_dim(self) -> Optional[int]:
        return next((e.dim for e in self.embedders.values() if e.output == "vector"), None)

    def embedder(self, kind: str) -> Optional[Embedder]:
        """The first embedder of a kind ("class", "text", "clip_text"), or None."""
        return next((e for e in self.embedders.values() if e.kind == kind), None)

    @property
    def is_conditional(self) -> bool:
        return len(self.embedders) > 0

    @property
    def num_classes(self) -> Optional[int]:
        classes = self.embedder("class")
        return classes.num_classes if classes is not None else None

    @property
    def reads_text(self) -> bool:
        return any(e.input_key == "caption" for e in self.embedders.values())

    def pair_makers(self) -> list:
        """What the data must add to each item for the map conditions (``lightning_ldm.data.pairs``)."""
        return [maker for maker in (e.pairs() for e in self.embedders.values()) if maker is not None]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------- set-up
    def prepare(self, datamodule, *, progress: bool = True) -> None:
        for embedder in self.embedders.values():
            embedder.prepare(datamodule, progress=progress)

    def share_state(self, other: "Conditioner") -> None:
        for name, embedder in self.embedders.items():
            embedder.share_state(other.embedders[name])

    # ----------------------------------------------------------------------------------- conditions
    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Each embedder's input from a batch, checked: one clear line when the data lacks it."""
        found = {}
        for name, embedder in self.embedders.items():
            for key in embedder.input_keys:
                if key not in batch:
                    raise DataError(f"conditioning {name!r} reads {key!r} from the batch, but the data gives only "
                                    f"{', '.join(sorted(batch))}" + _MISSING_HINT.get(key, ""))
            keys = embedder.input_keys
            found[name] = batch[keys[0]] if len(keys) == 1 else {key: batch[key] for key in keys}
            embedder.check_batch(found[name])
        return found

    def null_inputs(self, n: int) -> dict[str, Any]:
        return {name: embedder.null_values(n) for name, embedder in self.embedders.items()}

    def forward(self, inputs: Mapping[str, Any], device: torch.device, *, drop: bool = False,
                generator: Optional[torch.Generator] = None) -> Cond:
        """The UNet's keyword inputs for ``inputs`` (as from ``inputs()``). With ``drop``, each embedder
        replaces each item by its null condition with its own probability (classifier-free guidance training),
        drawn on ``device``: no host sync."""
        vectors, contexts, maps = [], [], []
        for name, embedder in self.embedders.items():
            values = inputs[name]
            dropped = None
            if drop and embedder.drop_rate > 0:
                n = _batch_size(values)
                dropped = torch.rand(n, device=device, generator=generator) < embedder.drop_rate
            out = embedder(values, device, dropped)
            {"vector": vectors, "context": contexts, "concat": maps}[embedder.output].append(out)
        cond: Cond = {}
        if vectors:
            cond["vector"] = vectors[0] if len(vectors) == 1 else torch.stack(vectors).sum(0)
        if contexts:
            cond["context"] = contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=1)
        if maps:
            cond["concat"] = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
        return cond

    def guidance_inputs(self, inputs: Mapping[str, Any], device: torch.device,
                        negative: Optional[Mapping[str, Any]] = None) -> tuple[Cond, Cond]:
        """(conditional, unconditional) outputs for guidance. ``negative`` replaces the null inputs of the
        unconditional branch where given (a negative prompt)."""
        n = _batch_size(next(iter(inputs.values())))
        null = self.null_inputs(n)
        null.update({name: inputs[name] for name, e in self.embedders.items() if e.guidance_keeps_input})
        if negative:
            null.update({k: v for k, v in negative.items() if k in null})
        return self(inputs, device), self(null, device)


_MISSING_HINT = {
    "caption": ": the data has no captions (metadata.jsonl or a .txt beside each image)",
    "low_res": ": super-resolution pairs are made by lightning_ldm.data.pairs.ImagePairs (the command line wraps the data)",
    "mask": ": inpainting masks are made by lightning_ldm.data.pairs.ImagePairs (the command line wraps the data)",
}


def join_for_guidance(cond: Cond, uncond: Cond) -> Cond:
    """One doubled batch [cond; uncond] of every input (the null branch broadcast where it has batch 1)."""
    joined = {}
    for key, value in cond.items():
        null = uncond[key]
        if null.shape[0] != value.shape[0]:
            null = null.expand(value.shape[0], *null.shape[1:])
        joined[key] = torch.cat([value, null.to(value.dtype)])
    return joined


def _batch_size(values: Any) -> int:
    if isinstance(values, Mapping):  # inputs encoded ahead (the latent cache's captions): a mapping of tensors
        values = next(iter(values.values()))
    return values.shape[0] if isinstance(values, Tensor) else len(values)
