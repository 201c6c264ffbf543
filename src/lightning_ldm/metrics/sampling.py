"""Samples of a stage-2 model, straight into features: what FID during training and ``stage=evaluate`` share.

Sample i starts from x_T drawn from ``torch.Generator().manual_seed(seed_start + i)`` (as ``stage=sample``), so
a deterministic sampler (DDIM eta=0, DPM-Solver++) gives the same images at every evaluation, whatever the
number of GPUs and the batch size: FIDs at different steps differ only because the model changed. Class labels
cycle through ``classes`` (all classes by default): seed s gets class s mod K, a balanced set; prompts likewise
(by default the module's evaluation prompts: the first caption of each validation image, as text-to-image FID
conditions on the reference set's captions). Stochastic samplers draw their step noise from a generator
seeded by each batch's first seed.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from lightning_ldm.distributed import gather_rows, rank_and_world, shard
from lightning_ldm.metrics.features import FeatureExtractor


@dataclass
class SamplingSettings:
    """None means the module's own setting (``module.sampling``: what its image grids use)."""

    sampler: Optional[str] = None
    steps: Optional[int] = None
    eta: Optional[float] = None
    guidance_scale: Optional[float] = None
    use_ema: bool = True
    classes: Optional[list[int]] = None
    prompts: Optional[list[str]] = None

    def resolve(self, module) -> "SamplingSettings":
        own = module.sampling
        pick = lambda mine, key: getattr(own, key) if mine is None else mine  # noqa: E731
        prompts = self.prompts or getattr(module, "evaluation_prompts", None)
        return SamplingSettings(pick(self.sampler, "sampler"), pick(self.steps, "steps"), pick(self.eta, "eta"),
                                pick(self.guidance_scale, "guidance_scale"), self.use_ema, self.classes, prompts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GeneratedFeatures:
    features: torch.Tensor  # (n, D) of all ranks, in seed order
    logits: Optional[torch.Tensor]  # (n, K) when the extractor gives Inception logits
    first_images: torch.Tensor  # [-1, 1] float, CPU: the first samples of rank 0's block, for a grid
    spec: dict[str, Any]  # the sampler that ran (name, steps, eta, spacing, timesteps)


def latent_shape(module) -> tuple[int, int, int]:
    return (module.first_stage.latent_channels, module.latent_size, module.latent_size)


@torch.no_grad()
def generated_features(module, extractor: FeatureExtractor, *, num_samples: int, seed_start: int,
                       settings: SamplingSettings, batch_size: int, keep_images: int = 0,
                       autocast: Callable[[], AbstractContextManager] = nullcontext,
                       progress: Callable = lambda iterable, **_: iterable) -> GeneratedFeatures:
    """Each rank samples and measures its contiguous block of seeds; every rank gets all the features."""
    from lightning_ldm.diffusion.seeds import initial_noise, labels_for, prompts_for

    settings = settings.resolve(module)
    rank, world = rank_and_world()
    seeds = [seed_start + i for i in shard(num_samples, rank, world)]
    device = module.device
    features, logits, kept, spec = [], [], [], None
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    for batch in progress(batches, desc=f"FID samples (rank {rank})", disable=rank != 0, leave=False):
        x_T = initial_noise(batch, latent_shape(module)).to(device)
        labels = labels_for(batch, settings.classes, getattr(module, "num_classes", None))
        conditioner = getattr(module, "conditioner", None)
        prompts = prompts_for(batch, settings.prompts, conditioner is not None and conditioner.reads_text)
        generator = torch.Generator(device=device).manual_seed(batch[0])
        with autocast():
            images, sampler_spec = module.generate(
                len(batch), labels=None if labels is None else labels.to(device), prompts=prompts, generator=generator,
                sampler=settings.sampler, steps=settings.steps, eta=settings.eta,
                guidance_scale=settings.guidance_scale, use_ema=settings.use_ema, x_T=x_T)
        out = extractor(images)
        features.append(out["features"])
        if "logits" in out:
            logits.append(out["logits"])
        if sum(len(k) for k in kept) < keep_images:
            kept.append(images[: keep_images - sum(len(k) for k in kept)].float().cpu())
        spec = spec or (sampler_spec.as_dict() if hasattr(sampler_spec, "as_dict") else dict(sampler_spec))
    empty = torch.zeros(0, dtype=torch.float32, device=extractor.device)
    all_features = gather_rows(torch.cat(features) if features else empty)
    all_logits = gather_rows(torch.cat(logits) if logits else empty) if extractor.provides_logits else None
    first = torch.cat(kept) if kept else torch.zeros(0)
    recorded = {**settings.as_dict(), **(spec or {})}
    if settings.prompts:  # the count, not the list: records stay readable
        recorded["prompts"] = f"{len(settings.prompts)} prompts, seed s gets prompt s mod {len(settings.prompts)}"
    return GeneratedFeatures(all_features, all_logits, first, recorded)
