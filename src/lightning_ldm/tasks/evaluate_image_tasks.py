"""``stage=evaluate`` of a model conditioned on an image: every number beside the trivial baseline's.

The pairs are the data's fixed validation pairs (``lightning_ldm.data.pairs``; ``evaluate.split``, the first
``num_samples`` of a fixed random subset): the same inputs at every evaluation. Output i starts from the noise of
seed ``seed_start + i``.

- Super-resolution: PSNR and SSIM against the high-resolution image, the Frechet distance of the extractor's
  features to those of the high-resolution images, and consistency: PSNR of the output brought back down (the
  pairs' own downsampling, without the degradation) against the input. Baseline: bicubic upsampling.
- Inpainting: the Frechet distance to the original images, PSNR inside the generated region, and the largest
  change of a kept pixel (in 8-bit levels; the composite keeps them exactly, so it must be 0). Baseline: the
  generated region filled by repeated blurring of the known pixels (normalised convolution).

Beside the Frechet distances, a ladder of known degradations of the same target images at the same n (JPEG q50,
a 3x3 blur, noise), so a reader can tell what a distance of a custom extractor means.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from lightning_ldm.data.pairs import PairedView
from lightning_ldm.diffusion.seeds import initial_noise
from lightning_ldm.distributed import gather_rows, rank_and_world, shard
from lightning_ldm.errors import ConfigError
from lightning_ldm.metrics.frechet import GaussianStatistics, frechet_distance
from lightning_ldm.metrics.ladder import degrade
from lightning_ldm.metrics.reference import reference_indices, split_view
from lightning_ldm.training.images import make_grid, to_uint8

LADDER = ("jpeg q50", "blur 3x3", "noise 0.2")


def bicubic_upsampling(low_res: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(low_res, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def blur_fill(image: torch.Tensor, generated: torch.Tensor, rounds: int = 64) -> torch.Tensor:
    """The generated region (1 in ``generated``) filled from the known pixels by repeated 3x3 normalised
    convolution: each round spreads the known colours one pixel further in, averaged; known pixels stay."""
    known = 1 - generated
    value, weight = image * known, known.clone()
    for _ in range(rounds):
        value = F.avg_pool2d(F.pad(value, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        weight = F.avg_pool2d(F.pad(weight, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        filled = value / weight.clamp_min(1e-8)
        value = known * image + generated * filled * (weight > 0)
        weight = known + generated * (weight > 0).float()
    return (known * image + generated * value).clamp(-1, 1)


def _per_image_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return peak_signal_noise_ratio((a + 1) / 2, (b + 1) / 2, data_range=1.0, reduction="none", dim=(1, 2, 3))


def _per_image_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return structural_similarity_index_measure((a + 1) / 2, (b + 1) / 2, data_range=1.0, reduction="none")


def _masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR over the pixels where ``mask`` is 1, per image, on [0, 1]."""
    mse = (((a - b) / 2) ** 2 * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * a.shape[1]).clamp_min(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


@torch.no_grad()
def evaluate_image_task(options, module, fabric, extractor, datamodule) -> tuple[dict, dict, Any]:
    task = module.image_task
    wanted = options.get("task")
    if wanted and wanted != task:
        raise ConfigError(f"evaluate.task={wanted}, but this checkpoint is {module.describe_conditioning()}"
                          + ("" if task is None else f" ({task})"))
    view = PairedView(split_view(datamodule, options.split, "evaluate.split"), module.conditioner.pair_makers(),
                      fixed_seed=datamodule.seed)
    indices = reference_indices(len(view), options.num_samples)
    rank, world = rank_and_world()
    mine = [indices[i] for i in shard(len(indices), rank, world)]
    positions = {index: i for i, index in enumerate(indices)}
    loader = DataLoader(Subset(view, mine), batch_size=options.batch_size, shuffle=False,
                        num_workers=datamodule.num_workers)
    rows: dict[str, list] = {}
    shown = []
    ladder_generator = torch.Generator().manual_seed(0)
    done = 0
    for batch in tqdm(loader, desc=f"evaluating {task.replace('_', '-')}", disable=rank != 0, leave=False):
        target = batch["image"].to(fabric.device)
        seeds = [options.seed_start + positions[i] for i in mine[done:done + len(target)]]
        done += len(target)
        generator = torch.Generator(device=fabric.device).manual_seed(seeds[0])
        common = dict(generator=generator, sampler=options.sampler, steps=options.steps, eta=options.eta,
                      guidance_scale=options.guidance_scale, use_ema=options.use_ema)
        labels = batch["label"].to(fabric.device) if module.num_classes else None
        prompts = list(batch["caption"]) if module.conditioner.reads_text else None
        if task == "super_resolution":
            low_res = batch["low_res"].to(fabric.device)
            embedder = module.conditioner.embedder("low_res")
            shape = (module.first_stage.latent_channels, embedder.latent_size(low_res.shape[-2]),
                     embedder.latent_size(low_res.shape[-1]))
            with fabric.autocast():
                output, spec = module.generate(len(target), labels=labels, prompts=prompts, low_res=low_res,
                                               x_T=initial_noise(seeds, shape).to(fabric.device), **common)
            baseline = bicubic_upsampling(low_res, target.shape[-2:])
            down = lambda x: F.interpolate(x, scale_factor=1 / embedder.factor, mode=embedder.degradation[  # noqa: E731
                "downsampling"], **({"antialias": True} if embedder.degradation["downsampling"] == "bicubic" else {}))
            for name, images in (("ours", output), ("bicubic", baseline)):
                rows.setdefault(f"psnr/{name}", []).append(_per_image_psnr(images, target))
                rows.setdefault(f"ssim/{name}", []).append(_per_image_ssim(images, target))
                rows.setdefault(f"consistency_psnr/{name}", []).append(_per_image_psnr(down(images).clamp(-1, 1), low_res))
            shown_input = F.interpolate(low_res, size=target.shape[-2:], mode="nearest")
        else:
            generated = batch["mask"].to(fabric.device)
            shape = (module.first_stage.latent_channels, target.shape[-2] // module.first_stage.downsampling_factor,
                     target.shape[-1] // module.first_stage.downsampling_factor)
            with fabric.autocast():
                output, spec = module.generate(len(target), labels=labels, prompts=prompts, image=target,
                                               keep=1 - generated, x_T=initial_noise(seeds, shape).to(fabric.device),
                                               **common)
            baseline = blur_fill(target, generated)
            kept = (1 - generated).bool().expand_as(target)
            for name, images in (("ours", output), ("blur_fill", baseline)):
                rows.setdefault(f"psnr_generated_region/{name}", []).append(_masked_psnr(images, target, generated))
                change = (to_uint8(images).int() - to_uint8(target).int()).abs() * kept.cpu()
                rows.setdefault(f"kept_pixels_max_change/{name}", []).append(change.flatten(1).amax(1).float())
            shown_input = target * (1 - generated)
        target8 = to_uint8(target)
        rows.setdefault("features/target", []).append(extractor(target)["features"])
        rows.setdefault("features/ours", []).append(extractor(output.float())["features"])
        rows.setdefault("features/baseline", []).append(extractor(baseline)["features"])
        for rung in LADDER:
            degraded = degrade(target8, rung, ladder_generator).float().to(fabric.device) / 127.5 - 1
            rows.setdefault(f"features/{rung}", []).append(extractor(degraded)["features"])
        if not shown:
            shown.append(torch.stack([shown_input, output.float(), baseline, target], dim=1)[:8].flatten(0, 1).cpu())
    gathered = {key: gather_rows(torch.cat(value).to(fabric.device).float()) for key, value in rows.items()}
    if not fabric.is_global_zero:
        return {}, {}, None
    n = len(gathered["features/target"])
    target_stats = GaussianStatistics.from_features(gathered["features/target"])
    baseline_name = "bicubic" if task == "super_resolution" else "blur_fill"
    label = extractor.label
    metrics: dict[str, Any] = {}
    for key, value in gathered.items():
        if not key.startswith("features/"):
            stat = value.max() if key.startswith("kept_pixels") else value.mean()
            metrics[f"{key.replace('/', '@' + str(n) + '/')}"] = float(stat)
    for name in ("ours", "baseline", *LADDER):
        shown_name = baseline_name if name == "baseline" else name
        distance = frechet_distance(target_stats, GaussianStatistics.from_features(gathered[f"features/{name}"]))
        metrics[f"{label}@{n}/{shown_name}"] = distance
    details = {
        "task": task, "num_samples": n, "split": options.split, "seeds": [options.seed_start, options.seed_start + n - 1],
        "pairs": "the data's fixed validation pairs (lightning_ldm.data.pairs.fixed_generator), "
                 "reference_indices(len(split), num_samples)",
        "sampling": spec.as_dict() if hasattr(spec, "as_dict") else str(spec),
        "baseline": baseline_name, "ladder": f"{', '.join(LADDER)} of the target images, same n",
        "definitions": "PSNR/SSIM per image on [0, 1], averaged; Frechet distances to the target images' features"
                   + ("; consistency: the output downsampled as the pairs are, against the input"
                      if task == "super_resolution" else "; kept_pixels_max_change: the largest, in 8-bit levels"),
    }
    grid = make_grid(to_uint8(shown[0]), 4) if shown else None  # rows: input, ours, baseline, target
    return metrics, details, grid
