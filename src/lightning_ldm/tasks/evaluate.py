"""``stage=evaluate``: the numbers of a finished model, with everything needed to reproduce them.

A stage-2 checkpoint of a super-resolution or inpainting model: its numbers against the trivial baseline's on
the data's fixed validation pairs (``evaluate_image_tasks.py``). Any other stage-2 checkpoint (``.ckpt`` or the
EMA export ``.safetensors``): FID from ``num_samples`` samples (50k, the
paper's protocol) against statistics of the *training* images of the ``data`` group (``reference_split: train``,
the usual convention) or of its held-out validation images (``reference_split: val``), plus KID, Inception Score
and precision/recall. The metric names do not carry the split; the printed lines and the report do. A stage-1
export (``export/autoencoder.safetensors``): rFID of the reconstructions of ``num_samples`` images of ``split``
against those same images, plus PSNR and SSIM (``reference_split`` is not used there).

The JSON report goes beside the checkpoint (``<name>.eval-<settings>.json``, or ``evaluate.report``) and into
the run directory: metrics, sample count, seeds, sampler, steps, eta, guidance, EMA or not, the extractor and
the SHA-256 of its weights, the reference statistics' key and hash, the data identity, precision and versions.
Sampling and feature extraction are split across ``devices`` (each rank a block of seeds); the result does not
depend on the device count for deterministic samplers.
"""

import json
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lightning_ldm import atomic
from lightning_ldm.diffusion.seeds import read_prompts
from lightning_ldm.errors import ConfigError
from lightning_ldm.file_format import model_kind
from lightning_ldm.metrics.callback import as_spec
from lightning_ldm.distributed import gather_rows, rank_and_world, shard
from lightning_ldm.metrics.features import build_feature_extractor, check_spec
from lightning_ldm.metrics.frechet import distance_to_reference
from lightning_ldm.metrics.reference import load_or_compute_reference, reference_indices, split_view
from lightning_ldm.metrics.sampling import SamplingSettings, generated_features
from lightning_ldm.metrics.scores import distribution_metrics
from lightning_ldm.metrics.weights import file_sha256
from lightning_ldm.tasks.run_dir import git_revision, package_versions, record_run
from lightning_ldm.tasks.run_lock import holds_run_lock
from lightning_ldm.training.images import make_grid, save_png, to_uint8
from lightning_ldm.training.loggers import log_to_training_run, training_run_of


@holds_run_lock
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    options = cfg.evaluate
    if options.ckpt is None:
        raise ConfigError("evaluate.ckpt is not set: give a stage-2 checkpoint (.ckpt / ldm-ema.safetensors) or a "
                          "stage-1 export (autoencoder.safetensors)")
    if options.num_samples < 2 or options.batch_size < 1:
        raise ConfigError(f"evaluate.num_samples={options.num_samples} must be >= 2 and batch_size >= 1")
    ckpt = Path(options.ckpt).expanduser().resolve()
    kind = model_kind(ckpt, "evaluate.ckpt")
    spec = as_spec(options.feature_extractor)
    check_spec(spec, "evaluate.feature_extractor")  # a missing weights file stops here, before any work
    precision = options.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    fabric = Fabric(accelerator=options.accelerator, devices=options.devices, precision=precision)
    fabric.launch()
    run_dir = Path(cfg.paths.run_dir)
    if fabric.is_global_zero:
        record_run(cfg, run_dir)
        print(f"Run directory: {run_dir}\nEvaluating {ckpt} ({'stage 2' if kind == 'diffusion' else 'stage 1'})")
    extractor = build_feature_extractor(spec, "evaluate.feature_extractor", fabric.device)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    cache_dir = Path(options.reference_cache_dir or Path(cfg.paths.output_root) / "fid_reference")
    start = time.perf_counter()
    run = _evaluate_diffusion if kind == "diffusion" else _evaluate_autoencoder
    metrics, details, grid = run(options, ckpt, fabric, extractor, datamodule, cache_dir)
    if not fabric.is_global_zero:
        return {}
    report = {
        "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt), "kind": kind, "metrics": metrics, **details,
        "feature_extractor": extractor.describe(), "data": datamodule.identity(),
        "evaluate": OmegaConf.to_container(options, resolve=True), "precision": precision,
        "world_size": fabric.world_size,
        "seconds": round(time.perf_counter() - start, 1), "git_revision": git_revision(Path(__file__).parent),
        "versions": package_versions(),
    }
    path = Path(options.report) if options.report else ckpt.parent / f"{ckpt.stem}.eval-{_tag(kind, details)}.json"
    text = json.dumps(report, indent=2, default=str)
    atomic.write_text(path, text)
    atomic.write_text(run_dir / "report.json", text)
    if grid is not None:
        save_png(grid, run_dir / "grid.png")
    against = f" (against the {details['reference_split']} split)" if "reference_split" in details else ""
    if "task" in details:
        against = f" (against the {details['split']} split's images)"
    for key, value in metrics.items():
        shown = f"{key} = {value:.6g}" if isinstance(value, float) else f"{key} = {value}"
        print(shown + (against if key.startswith(f"{extractor.label}@") else ""))
    print(f"Report: {path}")
    if OmegaConf.select(cfg, "logger.wandb") is not None:
        log_to_training_run(training_run_of(ckpt), metrics=metrics)
    return report


def _tag(kind: str, details: dict) -> str:
    n = details["num_samples"]
    if kind == "autoencoder":
        return f"{details['split']}{n}"
    s = details["sampling"]
    if "task" in details:
        return f"{details['task']}-{details['split']}{n}-{s.get('name')}{s.get('steps')}-seed{details['seeds'][0]}"
    weights = "ema" if s["use_ema"] else "raw"
    reference = "" if details["reference_split"] == "train" else f"-ref{details['reference_split']}"
    return (f"{n}-{s.get('name')}{s.get('steps')}-eta{s.get('eta')}-cfg{s.get('guidance_scale')}-{weights}"
            f"-seed{details['seeds'][0]}{reference}")


def _check_data(datamodule, image_size: int, channels: int, what: str) -> None:
    if datamodule.image_size != image_size or datamodule.channels != channels:
        raise ConfigError(f"data ({datamodule.name}, {datamodule.image_size}px, {datamodule.channels} channels) does "
                          f"not match the {what} ({image_size}px, {channels} channels); choose the data group it was "
                          "trained on, e.g. data=folder data.root=...")


def _evaluate_diffusion(options, ckpt, fabric, extractor, datamodule, cache_dir):
    from lightning_ldm.diffusion.checkpoint import load_diffusion_model

    module = load_diffusion_model(str(ckpt)).to(fabric.device).eval()
    _check_data(datamodule, module.image_size, module.first_stage.image_channels, "model")
    if module.image_task or options.get("task"):
        from lightning_ldm.tasks.evaluate_image_tasks import evaluate_image_task

        return evaluate_image_task(options, module, fabric, extractor, datamodule)
    wanted = set(options.metrics)
    reference = load_or_compute_reference(
        split_view(datamodule, options.reference_split, "evaluate.reference_split", whole_streams=True),
        identity=datamodule.identity(),
        extractor=extractor, cache_dir=cache_dir, split=options.reference_split, count=options.reference_num_images,
        batch_size=options.batch_size, keep_features=bool({"kid", "prc"} & wanted), num_workers=datamodule.num_workers)
    prompts = read_prompts(options.get("prompts"), options.get("prompt_file"))
    if prompts is None and module.conditioner.reads_text:  # the reference images' own captions (their first)
        view = split_view(datamodule, options.reference_split, "evaluate.reference_split", whole_streams=True)
        prompts = view.first_captions() or None
    settings = SamplingSettings(options.sampler, options.steps, options.eta, options.guidance_scale, options.use_ema,
                                list(options.classes) if options.classes else None, prompts)
    generated = generated_features(module, extractor, num_samples=options.num_samples, seed_start=options.seed_start,
                                   settings=settings, batch_size=options.batch_size,
                                   keep_images=options.num_grid_images if fabric.is_global_zero else 0,
                                   autocast=fabric.autocast, progress=tqdm)
    if not fabric.is_global_zero:
        return {}, {}, None
    metrics = distribution_metrics(generated.features, reference, label=extractor.label, logits=generated.logits,
                                   extra=sorted(wanted - {"fid"}), kid_subsets=options.kid_subsets,
                                   kid_subset_size=options.kid_subset_size, prc_neighborhood=options.prc_neighborhood)
    notes = []
    if "is" in wanted and generated.logits is None:
        notes.append(f"Inception Score skipped: {extractor.name} has no Inception logits")
    details = {
        "num_samples": options.num_samples, "seeds": [options.seed_start, options.seed_start + options.num_samples - 1],
        "labels": "seed s gets class classes[s % len(classes)]" if module.num_classes else None,
        "sampling": generated.spec, "weights": "ema" if options.use_ema or ckpt.suffix == ".safetensors" else "raw",
        "batch_step": module.batch_step, "reference_split": options.reference_split,
        "reference": _describe(reference), "notes": notes,
    }
    images = generated.first_images
    grid = make_grid(to_uint8(images), max(1, int(len(images) ** 0.5))) if len(images) else None
    return metrics, details, grid


@torch.no_grad()
def _evaluate_autoencoder(options, ckpt, fabric, extractor, datamodule, cache_dir):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from lightning_ldm.autoencoder.export import load_autoencoder_export

    model, metadata = load_autoencoder_export(ckpt)
    model = model.to(fabric.device).eval()
    _check_data(datamodule, datamodule.image_size, model.config["in_channels"], "autoencoder")
    trained_on = metadata.get("data") or {}
    if fabric.is_global_zero and trained_on.get("name") not in (None, datamodule.name):
        print(f"Note: the autoencoder was trained on {trained_on.get('name')}, evaluated on {datamodule.name}")
    dataset = split_view(datamodule, options.split, "evaluate.split")
    indices = reference_indices(len(dataset), options.num_samples)
    if len(indices) < 2:
        raise ConfigError(f"evaluate.split={options.split} has {len(indices)} image(s); FID needs at least 2")
    reference = load_or_compute_reference(dataset, identity=datamodule.identity(), extractor=extractor,
                                          cache_dir=cache_dir, split=options.split, count=options.num_samples,
                                          batch_size=options.batch_size, num_workers=datamodule.num_workers)
    rank, world = rank_and_world()
    mine = [indices[i] for i in shard(len(indices), rank, world)]
    loader = DataLoader(Subset(dataset, mine), batch_size=options.batch_size, shuffle=False,
                        num_workers=datamodule.num_workers)
    features, psnr, ssim, shown = [], [], [], []
    for batch in tqdm(loader, desc="reconstructions", disable=rank != 0, leave=False):
        x = batch["image"].to(fabric.device)
        with fabric.autocast():
            x_hat = model(x, sample_posterior=False).reconstruction
        x_hat = x_hat.float().clamp(-1, 1)
        features.append(extractor(x_hat)["features"])
        x01, xhat01 = (x + 1) / 2, (x_hat + 1) / 2
        psnr.append(peak_signal_noise_ratio(xhat01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssim.append(structural_similarity_index_measure(xhat01, x01, data_range=1.0, reduction="none"))
        if len(shown) < 1:
            shown.append(torch.cat([x[:8], x_hat[:8]]).cpu())
    empty = torch.zeros(0, device=fabric.device)
    features = gather_rows(torch.cat(features) if features else empty)
    psnr, ssim = (gather_rows(torch.cat(v).float() if v else empty) for v in (psnr, ssim))
    if not fabric.is_global_zero:
        return {}, {}, None
    n = len(features)
    metrics = {f"r{extractor.label}@{n}": distance_to_reference(reference.statistics, features),
               f"psnr@{n}": float(psnr.mean()), f"ssim@{n}": float(ssim.mean())}
    details = {"num_samples": n, "split": options.split, "images": "reference_indices(len(split), num_samples)",
               "reconstruction": "posterior mean / VQ code, clamped to [-1, 1]; PSNR/SSIM per image on [0, 1] floats, "
                                 "averaged", "reference": _describe(reference), "autoencoder_data": trained_on}
    grid = make_grid(to_uint8(shown[0]), len(shown[0]) // 2) if shown else None
    return metrics, details, grid


def _describe(reference) -> dict[str, Any]:
    return {"key": reference.key, "sha256": reference.digest, "file": str(reference.path),
            "n": reference.statistics.n, "reused": reference.reused}
