"""``stage=sample``: turn a stage-2 checkpoint (or EMA export) into images.

Image i comes from seed i: its starting noise x_T is drawn from ``torch.Generator().manual_seed(i)``, and its
condition is class or prompt i mod n of the given list (``diffusion/seeds.py``), so a
deterministic sampler (DDIM eta=0, DPM-Solver++) gives the same image for a seed whatever the batch size or
the number of GPUs, and a seed range can be split across runs. Stochastic samplers (DDPM, DDIM eta>0) draw
their step noise from a generator seeded by the batch's first seed. Every file is written atomically, and
images already on disk that read back whole are skipped, so an interrupted run resumes by rerunning it. A
text-to-image run also writes ``metadata.jsonl`` (file_name, text) beside the images: the folder is then a
captioned image set in the layout ``data=folder`` reads.
"""

import json

from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from lightning_ldm.diffusion.checkpoint import load_diffusion_model, newest_checkpoint
from lightning_ldm.diffusion.image_inputs import read_input_images
from lightning_ldm.diffusion.seeds import initial_noise, labels_for, prompts_for, read_prompts
from lightning_ldm.errors import CheckpointError, ConfigError, DataError
from lightning_ldm.atomic import atomic_path
from lightning_ldm.tasks.run_dir import record_run
from lightning_ldm.tasks.run_lock import holds_run_lock
from lightning_ldm.training.images import captioned_grid, is_readable_image, make_grid, save_png, to_uint8


def samples_to_make(seeds: list[int], out_dir: Path) -> list[int]:
    """The seeds whose image is not on disk whole; a file cut short is made again (and said so)."""
    todo, damaged = [], []
    for seed in tqdm(seeds, desc="checking existing samples", disable=len(seeds) < 5000, leave=False):
        path = out_dir / f"{seed:06d}.png"
        if not path.exists():
            todo.append(seed)
        elif not is_readable_image(path):
            todo.append(seed)
            damaged.append(path.name)
    if damaged:
        print(f"{len(damaged)} existing sample file(s) are unreadable and are made again: {', '.join(damaged[:5])}"
              + (" ..." if len(damaged) > 5 else ""))
    return todo


@holds_run_lock
def sample(cfg: DictConfig) -> None:
    options = cfg.sample
    run_dir = Path(cfg.paths.run_dir)
    ckpt = options.ckpt or newest_checkpoint(Path(cfg.paths.output_root))
    if ckpt is None:
        raise CheckpointError(f"no stage-2 checkpoint under {cfg.paths.output_root}; train one with "
                              "`python -m lightning_ldm stage=diffusion` or set sample.ckpt=/path/to/last.ckpt")
    fabric = Fabric(accelerator=options.accelerator, devices=options.devices,
                    precision=options.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true"))
    fabric.launch()
    if fabric.is_global_zero:
        record_run(cfg, run_dir)
        print(f"Run directory: {run_dir}\nSampling from {ckpt}")
    module = load_diffusion_model(str(ckpt)).to(fabric.device).eval()
    out_dir = Path(options.output_dir) if options.output_dir else run_dir / "images"
    out_dir.mkdir(parents=True, exist_ok=True)

    prompt_pool = read_prompts(options.get("prompts"), options.get("prompt_file"))
    if options.get("images"):
        return sample_from_images(cfg, fabric, module, out_dir, prompt_pool)
    if options.get("masks") or options.get("strength", 1.0) != 1.0:
        raise ConfigError("sample.masks and sample.strength apply to input images: set sample.images as well")
    seeds = list(range(options.seed_start, options.seed_start + options.num_samples))
    prompts_for(seeds[:1], prompt_pool, module.conditioner.reads_text)  # refuses a mismatch before any work
    mine = seeds[fabric.global_rank::fabric.world_size]
    todo = mine if options.format == "npz" else samples_to_make(mine, out_dir)
    shape = module.latent_shape()
    produced: dict[int, np.ndarray] = {}
    batches = [todo[i:i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    if fabric.device.type == "cuda":
        # Compiling pays for itself over a few batches of one shape; channels_last always helps on tensor cores.
        module.prepare_for_sampling(compile=options.compile if options.compile is not None else len(batches) >= 4)
    for batch in tqdm(batches, desc=f"rank {fabric.global_rank} sampling", disable=not fabric.is_global_zero):
        x_T = initial_noise(batch, shape).to(fabric.device)
        labels = labels_for(batch, options.classes, module.num_classes)
        generator = torch.Generator(device=fabric.device).manual_seed(batch[0])
        with fabric.autocast():
            images, spec = module.generate(len(batch), labels=None if labels is None else labels.to(fabric.device),
                                           prompts=prompts_for(batch, prompt_pool, module.conditioner.reads_text),
                                           negative_prompt=options.get("negative_prompt"),
                                           generator=generator, sampler=options.sampler, steps=options.steps,
                                           eta=options.eta, guidance_scale=options.guidance_scale,
                                           use_ema=options.use_ema, x_T=x_T)
        if not torch.isfinite(images).all():  # clamped to uint8, NaN would pass for black images
            raise CheckpointError(f"{ckpt}: the model produces non-finite images (seeds {batch[0]}-{batch[-1]}): its "
                                  "weights are damaged, as in a checkpoint saved after training diverged; sample an "
                                  "earlier checkpoint")
        for seed, image in zip(batch, to_uint8(images)):
            if options.format == "png":
                save_png(image, out_dir / f"{seed:06d}.png")
            produced[seed] = image.permute(1, 2, 0).numpy()
    fabric.barrier()
    if options.format == "npz":
        with atomic_path(out_dir / f"samples_rank{fabric.global_rank}.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, seeds=np.array(list(produced)),
                     images=np.stack(list(produced.values())) if produced else np.zeros(
                         (0, module.image_size, module.image_size, module.first_stage.image_channels), np.uint8))
    prompts = prompts_for(seeds, prompt_pool, module.conditioner.reads_text)
    if fabric.is_global_zero and prompts and options.format == "png":
        rows = [json.dumps({"file_name": f"{seed:06d}.png", "text": prompt}) for seed, prompt in zip(seeds, prompts)]
        with atomic_path(out_dir / "metadata.jsonl") as tmp:
            Path(tmp).write_text("\n".join(rows) + "\n", encoding="utf-8")
    if fabric.is_global_zero:
        first = [s for s in seeds[:options.grid_size]]
        grid_images = []
        for s in first:
            if s in produced:
                grid_images.append(torch.from_numpy(produced[s]).permute(2, 0, 1))
            elif (out_dir / f"{s:06d}.png").exists():
                array = np.array(Image.open(out_dir / f"{s:06d}.png"))
                grid_images.append(torch.from_numpy(array if array.ndim == 3 else array[..., None]).permute(2, 0, 1))
        if grid_images:
            nrow = int(np.ceil(np.sqrt(len(grid_images))))
            stacked = torch.stack(grid_images)
            # With prompts, each image above what it was asked (only the seeds on disk are in grid_images).
            if prompts:
                shown = [prompts[s - options.seed_start] for s in first
                         if s in produced or (out_dir / f"{s:06d}.png").exists()]
                grid = save_png(captioned_grid(stacked, shown, nrow), run_dir / "grid.png")
            else:
                grid = save_png(make_grid(stacked, nrow), run_dir / "grid.png")
            print(f"Wrote {len(seeds)} samples to {out_dir} and a grid to {grid}")


def check_image_task(module, masks: bool, strength: float) -> None:
    """One line when the inputs do not suit the model: what each kind of model does with input images."""
    task = module.image_task
    if task == "super_resolution" and (masks or strength != 1.0):
        raise ConfigError("this model super-resolves its input images: sample.masks and sample.strength do not apply")
    if task == "inpainting" and not masks:
        raise ConfigError("this model inpaints: give a mask per image (sample.masks=<folder or zip>, white = generate)")
    if task is None and not masks and strength == 1.0:
        raise ConfigError(f"this model is {module.describe_conditioning()}: with sample.images it can do image-to-image "
                          "(sample.strength < 1) or inpainting by replacement (sample.masks=...), not super-resolution "
                          "(train a model with conditioning=super_resolution)")


def sample_from_images(cfg: DictConfig, fabric: Fabric, module, out_dir: Path, prompt_pool) -> None:
    """One output per input image, named as the input: super-resolution for a model trained for it; else
    image-to-image at ``sample.strength`` and, with ``sample.masks``, inpainting (conditioned for a model
    trained to inpaint, by replacement for any other). Input i has seed ``seed_start + i`` and the i-th class or
    prompt, as generated images do."""
    options = cfg.sample
    check_image_task(module, bool(options.get("masks")), options.strength)
    factor = module.first_stage.downsampling_factor
    super_resolution = module.image_task == "super_resolution"
    inputs = read_input_images(options.images, options.get("masks"), channels=module.first_stage.image_channels,
                               factor=1 if super_resolution else factor)
    seeds = list(range(options.seed_start, options.seed_start + len(inputs.names)))
    prompts_for(seeds[:1], prompt_pool, module.conditioner.reads_text)
    try:
        shape = module.latent_shape(**{"low_res" if super_resolution else "image": inputs.pixels})
    except DataError as error:
        raise DataError(f"sample.images: {error}") from None
    mine = list(range(len(seeds)))[fabric.global_rank::fabric.world_size]
    outputs: dict[int, torch.Tensor] = {}
    for start in tqdm(range(0, len(mine), options.batch_size), desc="sampling from images",
                      disable=not fabric.is_global_zero):
        rows = mine[start:start + options.batch_size]
        batch = [seeds[i] for i in rows]
        labels = labels_for(batch, options.classes, module.num_classes)
        keep = None if inputs.keep is None else inputs.keep[rows]
        with fabric.autocast():
            images, _ = module.generate(
                len(batch), labels=None if labels is None else labels.to(fabric.device),
                prompts=prompts_for(batch, prompt_pool, module.conditioner.reads_text),
                negative_prompt=options.get("negative_prompt"),
                generator=torch.Generator(device=fabric.device).manual_seed(batch[0]), sampler=options.sampler,
                steps=options.steps, eta=options.eta, guidance_scale=options.guidance_scale, use_ema=options.use_ema,
                x_T=initial_noise(batch, shape).to(fabric.device),
                **({"low_res": inputs.pixels[rows]} if super_resolution else
                   {"image": inputs.pixels[rows], "strength": options.strength, "keep": keep}))
        for row, image in zip(rows, to_uint8(images)):
            path = out_dir / inputs.names[row]
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(image, path)
            outputs[row] = image
    fabric.barrier()
    if fabric.is_global_zero and outputs:
        # Input above output, column by column: what was asked and what came back.
        shown = sorted(outputs)[:max(1, options.grid_size // 2)]
        size = outputs[shown[0]].shape[-2:]  # a low-resolution input is shown at the output's size
        pairs = [t for row in shown for t in (
            to_uint8(torch.nn.functional.interpolate(inputs.pixels[row:row + 1], size=size, mode="nearest"))[0],
            outputs[row])]
        grid = save_png(make_grid(torch.stack(pairs), 2), Path(cfg.paths.run_dir) / "grid.png")
        what = ("super-resolved" if super_resolution else "inpainted" if inputs.keep is not None
                else f"strength {options.strength}")
        print(f"Wrote {len(inputs.names)} images to {out_dir} ({what}) and input/output pairs to {grid}")
