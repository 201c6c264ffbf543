"""Typed schema of the top level of the config.

Everything below the top level that Hydra instantiates (a node with ``_target_``) is typed by the target's
constructor signature instead (see ``validate.py``): the constructor is the schema, so the yaml maps to code
in one hop and the two can never drift apart.
"""

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def at_least(minimum: int, default: Any) -> Any:
    """A field whose value ``validate.py`` requires to be at least ``minimum`` (None passes where allowed)."""
    return field(default=default, metadata={"min": minimum})


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_root: str = "outputs"  # every run directory lives below this
    run_dir: str = "."  # filled from Hydra's run directory


@dataclass
class TaskConfig:
    name: str = "autoencoder"  # which stage this is; names run directories and exports
    run: str = "lightning_ldm.tasks.train.fit"  # function(cfg) that carries the stage out


@dataclass
class SampleConfig:
    """``stage=sample`` (see conf/stage/sample.yaml for what each key means)."""

    ckpt: Optional[str] = None
    num_samples: int = at_least(1, 64)
    seed_start: int = at_least(0, 0)
    batch_size: int = at_least(1, 64)
    sampler: Literal["ddpm", "ddim", "dpmpp_2m"] = "dpmpp_2m"
    steps: int = at_least(1, 20)
    eta: Optional[float] = None
    guidance_scale: float = 1.0
    classes: Optional[list[int]] = None
    prompts: Optional[list[str]] = None
    prompt_file: Optional[str] = None
    negative_prompt: Optional[str] = None
    images: Optional[str] = None
    masks: Optional[str] = None
    strength: float = 1.0
    use_ema: bool = True
    format: Literal["png", "npz"] = "png"
    output_dir: Optional[str] = None
    grid_size: int = at_least(0, 64)
    accelerator: str = "auto"
    devices: int = at_least(1, 1)
    precision: Optional[str] = None
    compile: Optional[bool] = None


@dataclass
class EvaluateConfig:
    """``stage=evaluate`` (see conf/stage/evaluate.yaml for what each key means)."""

    ckpt: Optional[str] = None
    num_samples: int = at_least(1, 50000)
    seed_start: int = at_least(0, 0)
    batch_size: int = at_least(1, 250)
    sampler: Optional[Literal["ddpm", "ddim", "dpmpp_2m"]] = None
    steps: Optional[int] = at_least(1, None)
    eta: Optional[float] = None
    guidance_scale: Optional[float] = None
    classes: Optional[list[int]] = None
    prompts: Optional[list[str]] = None
    prompt_file: Optional[str] = None
    use_ema: bool = True
    metrics: list[Literal["fid", "kid", "is", "prc"]] = field(default_factory=lambda: ["fid", "kid", "is", "prc"])
    feature_extractor: Any = None  # a FeatureExtractorSpec node, checked against its signature
    reference_split: Literal["train", "val"] = "train"
    reference_num_images: Optional[int] = None
    reference_cache_dir: Optional[str] = None
    split: Literal["train", "val"] = "val"
    task: Optional[Literal["super_resolution", "inpainting"]] = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = 3
    report: Optional[str] = None
    num_grid_images: int = 64
    accelerator: str = "auto"
    devices: int = 1
    precision: Optional[str] = None


@dataclass
class BenchmarkConfig:
    """``stage=benchmark`` (see conf/stage/benchmark.yaml for what each key means)."""

    stage: Optional[str] = None
    batch_size: Optional[int] = None
    warmup: int = 10
    steps: int = 20
    repeats: int = 3
    compile: Optional[bool] = None
    rows: Optional[list[str]] = None
    sampler: Literal["ddpm", "ddim", "dpmpp_2m"] = "dpmpp_2m"
    sample_steps: int = 20
    sample_batch_size: int = 256
    sample_repeats: int = 3
    num_workers: int = 8
    device: str = "auto"
    output: Optional[str] = None


@dataclass
class ExportConfig:
    """``stage=export`` (see conf/stage/export.yaml for what each key means)."""

    ckpt: Optional[str] = None
    output_dir: Optional[str] = None
    use_ema: bool = True
    wandb_artifact: bool = False


@dataclass
class DemoConfig:
    """``stage=demo`` (see conf/stage/demo.yaml for what each key means)."""

    ckpt: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = at_least(0, 7860)
    device: Optional[str] = None
    max_images: int = at_least(1, 16)
    max_steps: int = at_least(1, 100)


@dataclass
class RunConfig:
    """Top-level keys. Groups that are instantiated (data, module, trainer, ...) are typed by their targets."""

    task: TaskConfig = field(default_factory=TaskConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    float32_matmul_precision: Literal["highest", "high", "medium"] = "high"  # torch.set_float32_matmul_precision
    max_steps: int = at_least(1, 1000)  # training batches (our own counter, not Lightning's global_step)
    max_train_seconds: Optional[float] = None  # also stop after this much training time (evaluation excluded)
    run_name: str = "run"
    resume: Optional[str] = None  # "auto" (last checkpoint of this run directory) or a checkpoint path
    experiment_name: Optional[str] = None
    tags: list = field(default_factory=list)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    # Instantiated groups: their keys are checked against the targets' signatures.
    data: Any = None
    unet: Any = None
    schedule: Any = None
    autoencoder: Any = None
    loss: Any = None
    module: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    extras: Any = None
