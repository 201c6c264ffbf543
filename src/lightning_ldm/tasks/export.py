"""``stage=export``: a stage-2 model as a diffusers pipeline folder (``interop/diffusers_pipeline.py``).

The folder is written beside its destination under a temporary name and renamed when complete, so a crash leaves
no half-written pipeline; an existing destination is never overwritten.
"""

import shutil
from pathlib import Path

from omegaconf import DictConfig

from lightning_ldm.diffusion.checkpoint import load_diffusion_model, newest_checkpoint
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.file_format import resolve_model_file
from lightning_ldm.training.loggers import log_to_training_run, training_run_of


def export(cfg: DictConfig) -> Path:
    options = cfg.export
    if not options.output_dir:
        raise ConfigError("export.output_dir is not set: name a new folder for the diffusers pipeline")
    destination = Path(options.output_dir).expanduser()
    if destination.exists():
        raise ConfigError(f"export.output_dir={destination} exists; nothing was overwritten: name a new folder")
    source = options.ckpt or newest_checkpoint(Path(cfg.paths.output_root))
    if source is None:
        raise CheckpointError(f"no stage-2 checkpoint under {cfg.paths.output_root}: set export.ckpt=<run dir or file>")
    path = resolve_model_file(source)
    module = load_diffusion_model(str(path)).eval()
    from lightning_ldm.interop.diffusers_pipeline import save_pipeline, to_diffusers_pipeline

    pipeline = to_diffusers_pipeline(module, use_ema=options.use_ema)
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    partial.parent.mkdir(parents=True, exist_ok=True)
    save_pipeline(pipeline, partial)
    partial.rename(destination)
    print(f"Exported {path} as a diffusers {type(pipeline).__name__} to {destination}\n"
          f"  load it with: diffusers.DiffusionPipeline.from_pretrained({str(destination)!r}"
          + (", trust_remote_code=True)  (its pipeline.py: diffusers has none for class labels)"
             if (destination / "pipeline.py").is_file() else ")"))
    if type(pipeline).__name__ == "LDMTextToImagePipeline" and module.first_stage.downsampling_factor != 8:
        size = 8 * module.latent_size  # that pipeline's latents are height // 8 whatever the first stage's factor
        print(f"  LDMTextToImagePipeline assumes a factor-8 first stage; this one's is "
              f"{module.first_stage.downsampling_factor}: call it with height={size}, width={size}")
    if options.wandb_artifact:
        if log_to_training_run(training_run_of(path), artifact=destination) is None:
            print(f"W&B: {path} is not in a run directory that logged to W&B; no artifact was added")
    return destination
