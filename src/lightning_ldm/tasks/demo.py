"""``stage=demo``: a local web page (gradio) that samples a stage-2 model: prompt or class, seed, number of images,
steps and guidance in, a gallery of images out. Image i comes from seed ``seed + i``, as with ``stage=sample`` and
``load_pipeline``, so an image seen on the page can be made again from the command line or the Python API."""

import os
import socket
from pathlib import Path

from omegaconf import DictConfig

from lightning_ldm.diffusion.checkpoint import newest_checkpoint
from lightning_ldm.errors import CheckpointError, ConfigError, UserError
from lightning_ldm.extras import import_extra
from lightning_ldm.pipeline import LatentDiffusionPipeline, load_pipeline
from lightning_ldm.training.loggers import training_run_of


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read at import and launch: no telemetry, no version check
    return import_extra("demo")


def free_port(host: str) -> int:
    """A port nothing listens on: gradio given port 0 looks for its server at port 0 and fails to start."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def build_app(pipe: LatentDiffusionPipeline, max_images: int, max_steps: int, name: str = "latent diffusion model"):
    """The page: one control per input the model takes, a Generate button and a gallery (PNG: exact pixels)."""
    gr = _gradio()
    settings = pipe.module.sampling
    size = pipe.module.image_size
    with gr.Blocks(title=f"{name}: {pipe.describe()}") as app:
        gr.Markdown(f"# {name}\nA latent diffusion model, {pipe.describe()}, making {size}x{size} images. "
                    "Image i comes from seed + i.")
        controls = {}  # pipeline argument -> its control, in the order generate() receives them
        if pipe.reads_text:
            controls["prompt"] = gr.Textbox(label="Prompt", placeholder="a red 3")
        with gr.Row():
            if pipe.num_classes is not None:
                # No bounds on the box: an unknown class gets the pipeline's own one-line message.
                controls["classes"] = gr.Number(label=f"Class (0 to {pipe.num_classes - 1})", value=0, precision=0)
            controls["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0)
            controls["n"] = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Number of images")
            controls["steps"] = gr.Slider(1, max_steps, value=min(settings.steps, max_steps), step=1,
                                          label="Sampler steps")
            if pipe.reads_text or pipe.num_classes is not None:
                controls["guidance"] = gr.Number(label="Guidance scale (1 = none)", value=settings.guidance_scale)
        button = gr.Button("Generate", variant="primary")
        # fit_columns=False: two images of 32x32 pixels stay thumbnails rather than widening to the page
        gallery = gr.Gallery(label="Images", format="png", elem_id="gallery", columns=4, fit_columns=False,
                             object_fit="contain")

        def generate(*values):
            options = {key: int(value) if key in ("classes", "seed", "n", "steps") and value is not None else value
                       for key, value in zip(controls, values)}  # sliders give floats
            options["seed"] = options["seed"] or 0  # an emptied box
            try:
                images = pipe(**options)
            except UserError as error:
                raise gr.Error(str(error)) from None
            return [(image, f"seed {options['seed'] + i}") for i, image in enumerate(images)]

        button.click(generate, inputs=list(controls.values()), outputs=gallery)
    return app


def model_name(ckpt) -> str:
    """The run's name for a run's checkpoint or export, else the file's."""
    run = training_run_of(Path(ckpt))
    return run.name if run is not None else Path(ckpt).name


def demo(cfg: DictConfig) -> None:
    options = cfg.demo
    _gradio()  # before loading a model: a missing extra is one line at once
    ckpt = options.ckpt or newest_checkpoint(Path(cfg.paths.output_root))
    if ckpt is None:
        raise CheckpointError(f"no stage-2 checkpoint under {cfg.paths.output_root}; train one with "
                              "`python -m lightning_ldm stage=diffusion` or set demo.ckpt=/path/to/run")
    pipe = load_pipeline(ckpt, options.device)
    if not isinstance(pipe, LatentDiffusionPipeline):
        raise CheckpointError(f"{ckpt} is a stage-1 autoencoder: stage=demo samples a stage-2 model")
    if pipe.image_task is not None:
        verb = "super-resolves" if pipe.image_task == "super_resolution" else "inpaints"
        raise ConfigError(f"stage=demo samples from noise; this model {verb}: use stage=sample sample.images=...")
    app = build_app(pipe, options.max_images, options.max_steps, name=model_name(ckpt))
    port = options.port or free_port(options.host)
    _, url, _ = app.launch(server_name=options.host, server_port=port, prevent_thread_lock=True, quiet=True)
    print(f"Sampling {ckpt} ({pipe.describe()}) at {url} (Ctrl-C stops)", flush=True)
    app.block_thread()  # until Ctrl-C, then closes the server
