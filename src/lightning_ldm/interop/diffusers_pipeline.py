"""A stage-2 model as the diffusers pipeline that samples it the same way, ready for ``save_pretrained``.

| model | pipeline | components |
|---|---|---|
| unconditional, latent | ``LDMPipeline`` | vqvae (AutoencoderKL or VQModel), unet (UNet2DModel), scheduler |
| unconditional, pixel space | ``DDIMPipeline`` | unet, scheduler |
| text, the jointly trained encoder | ``LDMTextToImagePipeline`` | vqvae, bert (LDMBertModel), tokenizer, unet, scheduler |
| text, a frozen CLIP tower | ``StableDiffusionPipeline`` | vae, text_encoder, tokenizer, unet, scheduler |
| classes added to the time embedding | ``ClassConditionalLDMPipeline`` | vqvae, unet (with the class table), scheduler |

diffusers has no pipeline for class labels with a VAE: the last is ours (``class_pipeline.py``), written into the
folder as ``pipeline.py`` and loaded with ``trust_remote_code=True``. Classes read through cross-attention and the
super-resolution and inpainting inputs have no pipeline and are refused in one line (their UNet and VAE still
convert, through ``lightning_ldm.interop.unet`` / ``autoencoder``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lightning_ldm.errors import ConfigError
from lightning_ldm.extras import import_extra

# our schedule kinds -> diffusers' beta_schedule (diffusers' "scaled_linear" is LDM's linear-in-sqrt(beta))
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler_for(module) -> Any:
    """The diffusers scheduler that runs the model's own sampler on its noise schedule: DDIM (trailing spacing),
    DPM-Solver++(2M) or DDPM, with the model's prediction type."""
    diffusers = import_extra("diffusers")
    schedule = module.rebuild_config["schedule"]
    kind = schedule.get("kind", "scaled_linear")
    if kind == "cosine" and abs(schedule.get("cosine_s", 0.008) - 0.008) > 1e-12:
        raise ConfigError(f"diffusers' cosine schedule fixes s = 0.008; this model's is {schedule['cosine_s']}")
    common = dict(num_train_timesteps=schedule.get("num_timesteps", 1000), beta_start=schedule.get("beta_start", 0.0015),
                  beta_end=schedule.get("beta_end", 0.0195), beta_schedule=BETA_SCHEDULES[kind],
                  prediction_type=PREDICTION_TYPES[module.prediction], timestep_spacing="trailing")
    sampler = module.sampling.sampler
    if sampler == "ddim":
        # set_alpha_to_one: the last step returns the x0 estimate, as our DDIM does. steps_offset is read only by
        # "leading" spacing; 1 keeps StableDiffusionPipeline from rewriting the config with a deprecation warning.
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                     final_sigmas_type="zero")
    return diffusers.DDPMScheduler(**common, clip_sample=False)


def _text_components(module, networks) -> dict[str, Any]:
    embedders = list(networks["conditioner"].embedders.values())
    if len(embedders) != 1:
        raise ConfigError(f"diffusers' text-to-image pipelines take one text encoder; this model is "
                          f"{module.describe_conditioning()}")
    embedder = embedders[0]
    if embedder.kind == "text":
        from lightning_ldm.interop.text import text_encoder_to_diffusers, tokenizer_to_transformers

        return {"bert": text_encoder_to_diffusers(embedder.encoder),
                "tokenizer": tokenizer_to_transformers(embedder.tokenizer)}
    if embedder.kind == "clip_text":
        import transformers

        from lightning_ldm.conditioning.clip_text import resolve_folders

        if embedder.layer != "last":
            raise ConfigError("this model reads CLIP's penultimate layer: StableDiffusionPipeline reads it with "
                              "clip_skip=1 at every call, which a saved pipeline cannot remember; export refused")
        model_folder, tokenizer_folder = resolve_folders(embedder.path)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
        tokenizer.model_max_length = embedder.length  # StableDiffusionPipeline pads every prompt to this length
        return {"text_encoder": transformers.CLIPTextModel.from_pretrained(model_folder), "tokenizer": tokenizer}
    raise ConfigError(f"no diffusers pipeline takes this model's {embedder.kind!r} condition "
                      f"({module.describe_conditioning()})")


def to_diffusers_pipeline(module, use_ema: bool = True):
    """The diffusers pipeline of a loaded stage-2 ``DiffusionModule`` (see the table above)."""
    diffusers = import_extra("diffusers")
    from lightning_ldm.interop.unet import unet_to_diffusers

    networks = module.ema.model if use_ema else module.trained_networks()
    conditioner = networks["conditioner"]
    kinds = {e.kind for e in conditioner.embedders.values()}
    classes = conditioner.embedder("class")
    if kinds & {"low_res", "inpainting"} or (classes is not None and (classes.output != "vector" or len(kinds) > 1)):
        raise ConfigError(f"diffusers has no pipeline for a latent model {module.describe_conditioning()}"
                          + (" through cross-attention" if classes is not None and classes.output != "vector" else "")
                          + ": export covers unconditional, class-conditional (ADM) and text-to-image models")
    unet = unet_to_diffusers(networks["unet"], None if classes is None else classes.table.weight.detach())
    unet.register_to_config(sample_size=module.latent_size)
    scheduler = scheduler_for(module)
    first_stage = module.first_stage
    if first_stage.autoencoder is None:
        if kinds:
            raise ConfigError("diffusers' pixel-space pipeline is unconditional; this model is "
                              f"{module.describe_conditioning()}")
        return diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    from lightning_ldm.interop.autoencoder import autoencoder_to_diffusers

    vae = autoencoder_to_diffusers(first_stage.autoencoder, scaling_factor=float(first_stage.scale_factor))
    if not kinds:
        return diffusers.LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler)
    if classes is not None:
        from lightning_ldm.interop.class_pipeline import ClassConditionalLDMPipeline

        return ClassConditionalLDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler)
    text = _text_components(module, networks)
    if "bert" in text:
        return diffusers.LDMTextToImagePipeline(vqvae=vae, unet=unet, scheduler=scheduler, **text)
    return diffusers.StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False, **text)


def save_pipeline(pipeline, folder: Path) -> None:
    """``save_pretrained``, and for our own pipeline class its code beside it, named in ``model_index.json`` the
    way diffusers finds a pipeline that is not its own."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    if type(pipeline).__module__.startswith("lightning_ldm."):
        from lightning_ldm.interop import class_pipeline

        shutil.copyfile(class_pipeline.__file__, Path(folder) / "pipeline.py")
        index_file = Path(folder) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = ["pipeline", type(pipeline).__name__]
        index_file.write_text(json.dumps(index, indent=2) + "\n")
