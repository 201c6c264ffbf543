"""``stage=benchmark``: how fast a preset trains and samples here, on synthetic inputs of the preset's shapes.

    python -m lightning_ldm stage=benchmark experiment=celebahq-ldm-vq-4     # stage 2: cached / on the fly, sampling
    python -m lightning_ldm stage=benchmark experiment=kl-f8                 # stage 1: without / with discriminator

The preset is composed again as its own stage would train it (same module, network, batch, precision, compile
setting), then each row runs the real ``Trainer.fit`` loop on one device for ``warmup`` batches (compilation and
cuDNN autotuning) and ``repeats`` windows of ``steps`` batches; throughput is the median window. Model FLOPs per
step come from ``FlopCounterMode`` on one eager batch (forward + backward, no recomputation; 2 FLOPs per
multiply-add), MFU is achieved FLOP/s over a bf16 matmul timed in the same process. Weights are random: speed
does not depend on them (a missing LPIPS/VGG file is replaced by random weights and the row says so).
"""

import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.flop_counter import FlopCounterMode

from lightning_ldm import atomic
from lightning_ldm.data.synthetic import SyntheticDataModule
from lightning_ldm.errors import ConfigError, MissingWeightsError


CACHED, ON_THE_FLY = "stage 2: cached latents", "stage 2: encoding on the fly"


@dataclass
class Row:
    name: str
    batch_size: int
    images_per_sec: float
    step_ms: float
    gflop_per_image: float
    tflops: float
    mfu: Optional[float]
    peak_memory_gib: Optional[float]
    windows_images_per_sec: list = field(default_factory=list)
    note: str = ""
    parts_ms_per_image: dict = field(default_factory=dict)  # where a row's time goes, when it is measured apart


# ------------------------------------------------------------------------------------------------ composition
def target_config(cfg: DictConfig) -> DictConfig:
    """The config the benchmarked stage trains with: this run's overrides, with its own stage instead of benchmark."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task
                 if not o.lstrip("+~").startswith(("stage=", "benchmark.", "benchmark="))]
    stage = cfg.benchmark.stage
    if stage is not None:
        if stage not in ("autoencoder", "diffusion"):
            raise ConfigError(f"benchmark.stage={stage}: use autoencoder or diffusion (or null: the experiment's)")
        overrides.append(f"stage={stage}")
    elif not any(o.startswith("experiment=") for o in overrides):
        overrides.append("stage=diffusion")
    return compose(config_name="config", overrides=overrides)


def random_first_stage(node: DictConfig, data: DictConfig):
    """The preset's first stage with random weights: an export is replaced by the architecture it must have."""
    from lightning_ldm.autoencoder.model import PAPER_PRESETS, SMALL_PRESETS
    from lightning_ldm.latent.first_stage import rebuild_first_stage

    if not str(node.get("_target_", "")).endswith("load_first_stage"):
        first_stage = instantiate(node)  # identity (pixel space)
    else:
        regularizer, f = node.get("regularizer"), node.get("downsampling_factor")
        if regularizer is None or f is None:
            raise ConfigError("benchmark: the first stage is an export of unknown shape; set autoencoder.regularizer "
                              "and autoencoder.downsampling_factor (the paper presets do), or choose autoencoder=<preset>")
        name = f"{regularizer}-f{f}"
        config = PAPER_PRESETS.get(name) or SMALL_PRESETS.get(f"{name}-small")
        if config is None:
            raise ConfigError(f"benchmark: no autoencoder preset {name}; choose autoencoder=<preset>")
        config = {**config, "in_channels": data.channels, "resolution": data.image_size}
        first_stage = rebuild_first_stage({"config": config, "export": f"random {name}"},
                                          sample_posterior=node.get("sample_posterior", True))
    first_stage.scale_factor.fill_(1.0)  # no estimation pass: the scale does not change the cost
    return first_stage


def random_vgg16_file(folder: Path) -> Path:
    import torchvision

    path = folder / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------ measuring
def bf16_matmul_tflops(device: torch.device) -> Optional[float]:
    """The practical peak: median of 8192^3 bf16 matmuls on random data (zeros run faster than real data)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 ** 3 / statistics.median(times) / 1e12


class _WindowTimer(L.Callback):
    """Training seconds (the module's clock: synchronised, evaluation excluded) at the end of each window."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.marks = warmup, steps, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        done = module.batch_step + 1  # callbacks run before the module counts this batch
        if done >= self.warmup and (done - self.warmup) % self.steps == 0:
            self.marks.append(module.training_seconds())
            if done == self.warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()


class _FlopCounter(L.Callback):
    """FLOPs of one whole training batch (the second: the first may set things up)."""

    def __init__(self) -> None:
        self.mode, self.flops = None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if module.batch_step == 1:
            self.mode = FlopCounterMode(display=False)
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.flops, self.mode = self.mode.get_total_flops(), None


def _fit(module_factory, data: SyntheticDataModule, trainer_options: dict, callbacks: list, max_steps: int,
         root: Path) -> L.LightningModule:
    module = module_factory()
    module.max_steps = max_steps
    module.save_final_checkpoint = False
    trainer = L.Trainer(**trainer_options, callbacks=callbacks, default_root_dir=str(root), max_steps=-1,
                        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=module.wrap_data(data) if hasattr(module, "wrap_data") else data)
    return module


def measure_training(name: str, module_factory, data: SyntheticDataModule, trainer_options: dict, options: DictConfig,
                     peak_tflops: Optional[float], root: Path, note: str = "") -> Row:
    counter = _FlopCounter()
    _fit(lambda: _eager(module_factory()), data, trainer_options, [counter], 2, root)
    timer = _WindowTimer(options.warmup, options.steps)
    _fit(module_factory, data, trainer_options, [timer], options.warmup + options.steps * options.repeats, root)
    window_seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    batch = data.batch_size
    rates = [options.steps * batch / s for s in window_seconds]
    step_seconds = statistics.median(window_seconds) / options.steps
    tflops = counter.flops / step_seconds / 1e12
    return Row(name=name, batch_size=batch, images_per_sec=round(batch / step_seconds, 2),
               step_ms=round(step_seconds * 1e3, 2), gflop_per_image=round(counter.flops / batch / 1e9, 2),
               tflops=round(tflops, 1), mfu=round(tflops / peak_tflops, 4) if peak_tflops else None,
               peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
               windows_images_per_sec=[round(r, 2) for r in rates], note=note)


def _eager(module: L.LightningModule) -> L.LightningModule:
    module.compile_setting = False  # FlopCounterMode sees aten ops only in eager mode
    return module


def measure_sampling(module, options: DictConfig, device: torch.device, peak_tflops: Optional[float]) -> Row:
    """End to end: solver steps on the EMA network plus decoding, for one batch of ``sample_batch_size``."""
    module = module.to(device).eval()
    compile = options.compile if options.compile is not None else device.type == "cuda"
    n, steps = options.sample_batch_size, options.sample_steps
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def generate():
        with autocast:
            return module.generate(n, sampler=options.sampler, steps=steps)

    with FlopCounterMode(display=False) as counter:  # eager: FlopCounterMode sees aten ops only
        generate()
    if device.type == "cuda":
        module.prepare_for_sampling(compile=compile)
    times = _wall_times(generate, options.sample_repeats, device, warmup=2)
    seconds = statistics.median(times)
    tflops = counter.get_total_flops() / seconds / 1e12
    rate = n / seconds
    # The decode alone, as generate() runs it (under the same autocast), on latents of the sampled shape: its share.
    z = torch.randn(n, module.first_stage.latent_channels, module.latent_size, module.latent_size, device=device)

    def decode():
        with autocast:
            return module.decode_latents(z)

    decode_seconds = statistics.median(_wall_times(decode, options.sample_repeats, device, warmup=1))
    parts = {"solver": (seconds - decode_seconds) / n, "decode": decode_seconds / n}
    return Row(name=f"sampling: {options.sampler} {steps} steps + decode", batch_size=n,
               images_per_sec=round(rate, 2), step_ms=round(seconds * 1e3, 2),
               gflop_per_image=round(counter.get_total_flops() / n / 1e9, 2), tflops=round(tflops, 1),
               mfu=round(tflops / peak_tflops, 4) if peak_tflops else None,
               peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
               windows_images_per_sec=[round(n / t, 2) for t in times],
               note=f"50,000 samples: {50000 / rate / 60:.1f} min; {'compiled' if compile else 'eager'}; "
                    f"decode {decode_seconds / seconds:.0%} of it",
               parts_ms_per_image={k: round(v * 1e3, 3) for k, v in parts.items()})


def _wall_times(work, repeats: int, device: torch.device, warmup: int) -> list[float]:
    """Wall times of ``repeats`` calls of work() after ``warmup`` untimed ones (compilation, cuDNN autotuning)."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------------ the task
ROWS = {"diffusion": ("cached", "on_the_fly", "sampling"),
        "autoencoder": ("discriminator_off", "discriminator_on")}


def benchmark(cfg: DictConfig) -> dict:
    options = cfg.benchmark
    # Each row is a Trainer of its own: its start-up banners would bury the table.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    target = target_config(cfg)
    stage = target.task.name
    if stage not in ROWS:
        raise ConfigError(f"benchmark: the preset trains stage={stage}; benchmark.stage must be autoencoder or diffusion")
    wanted = list(options.rows) if options.rows is not None else list(ROWS[stage])
    unknown = [row for row in wanted if row not in ROWS[stage]]
    if unknown or not wanted:
        raise ConfigError(f"benchmark.rows={wanted}: stage {stage} has the rows {list(ROWS[stage])}")
    with open_dict(target):
        if options.compile is not None:
            target.module.compile = options.compile
        batch = options.batch_size or target.data.batch_size
    accelerator = "gpu" if torch.cuda.is_available() and options.device != "cpu" else "cpu"
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    precision = target.trainer.precision if accelerator == "gpu" else "32-true"
    if accelerator == "gpu" and str(precision).startswith("32"):
        precision = "bf16-mixed"
    trainer_options = dict(accelerator=accelerator, devices=1, precision=precision)
    if accelerator == "gpu":
        torch.backends.cudnn.benchmark = True
    peak = bf16_matmul_tflops(device)
    conditioning = target.module.get("conditioning")
    embedders = OmegaConf.to_container(conditioning, resolve=True) if conditioning else {}
    num_classes = next((e["num_classes"] for e in embedders.values() if e.get("kind") == "class"), None)
    captioned = any(e.get("input_key") == "caption" for e in embedders.values())
    images_needed = batch * (options.warmup + options.steps * options.repeats + 2)

    def data(n_images: int) -> SyntheticDataModule:
        return SyntheticDataModule(num_images=max(n_images, 2 * batch + 2), image_size=target.data.image_size,
                                   channels=target.data.channels, num_classes=num_classes, captions=captioned,
                                   batch_size=batch,
                                   num_workers=options.num_workers, val_fraction=0.0, seed=0)

    result = {
        "stage": stage, "experiment": target.get("experiment_name"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "lightning": L.__version__, "precision": precision,
        "compile": target.module.get("compile") if target.module.get("compile") is not None else device.type == "cuda",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "bf16_matmul_tflops": round(peak, 1) if peak else None,
        "image_size": target.data.image_size, "rows": [],
    }
    output = Path(options.output or Path(cfg.paths.run_dir) / "benchmark.json")
    output.parent.mkdir(parents=True, exist_ok=True)

    def add(row: Row) -> None:  # written after every row: a run stopped half-way keeps what it measured
        result["rows"].append(asdict(row))
        rates = {r["name"]: r["images_per_sec"] for r in result["rows"]}
        if CACHED in rates and ON_THE_FLY in rates:
            result["cached_over_on_the_fly"] = round(rates[CACHED] / rates[ON_THE_FLY], 3)
        atomic.write_text(output, json.dumps(result, indent=2))
        print(f"{row.name}: {row.images_per_sec} images/s", flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="ldm-benchmark-"))
    if stage == "diffusion":
        first_stage = random_first_stage(target.autoencoder, target.data)

        def diffusion_module(cache: bool):
            def build():
                import copy

                module = instantiate(target.module, first_stage=copy.deepcopy(first_stage), cache_latents=cache,
                                     cache_dir=str(scratch / "latent_cache"), num_log_images=0)
                return module
            return build

        latent_note = f"first stage {first_stage.source or first_stage.regularizer}"
        for row in wanted:
            if row == "cached":  # the cache holds one latent per image: a small set re-read every epoch, same work
                add(measure_training(CACHED, diffusion_module(True), data(4 * batch), trainer_options, options,
                                     peak, scratch, latent_note))
            elif row == "on_the_fly" and first_stage.autoencoder is not None:  # an identity stage has no encoder
                add(measure_training(ON_THE_FLY, diffusion_module(False), data(min(images_needed, 2048)),
                                     trainer_options, options, peak, scratch, latent_note))
            elif row == "sampling":
                add(measure_sampling(diffusion_module(False)(), options, device, peak))
    else:
        note = ""
        with open_dict(target):
            if target.loss.get("perceptual_weight", 0):
                from lightning_ldm.losses.lpips import find_vgg16_weights
                try:
                    find_vgg16_weights(target.loss.get("lpips_weights"))
                except MissingWeightsError:
                    target.loss.lpips_weights = str(random_vgg16_file(scratch))
                    note = "LPIPS with a random VGG16 trunk (timing only)"

        def autoencoder_module(disc_start: int):
            def build():
                with open_dict(target):
                    target.loss.disc_start = disc_start
                module = instantiate(target.module)
                module.image_log_every = 0
                return module
            return build

        train_data = data(min(images_needed, 2048))
        for row in wanted:
            active = row == "discriminator_on"
            name = "stage 1: autoencoder + discriminator" if active else "stage 1: autoencoder, discriminator off"
            add(measure_training(name, autoencoder_module(0 if active else 10**9), train_data, trainer_options,
                                 options, peak, scratch, note))

    print(format_table(result))
    print(f"Benchmark written to {output}")
    return result


def format_table(result: dict) -> str:
    peak = result["bf16_matmul_tflops"]
    lines = [f"{result['device']}, torch {result['torch']}, {result['precision']}, compile {result['compile']}, "
             f"float32 matmuls {result['float32_matmul_precision']}" + (f", bf16 matmul {peak} TFLOP/s" if peak else ""),
             "| row | batch | images/s | ms/step | GFLOP/image | TFLOP/s | MFU | peak GiB | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        memory = row["peak_memory_gib"] if row["peak_memory_gib"] is not None else "-"
        lines.append(f"| {row['name']} | {row['batch_size']} | {row['images_per_sec']} | {row['step_ms']} | "
                     f"{row['gflop_per_image']} | {row['tflops']} | {mfu} | {memory} | {row['note']} |")
    return "\n".join(lines)

