"""Stage 2 training: a UNet learns to denoise the scaled latents of the frozen first stage.

L_LDM = E_{z=s E(x), eps, t} w(t) || target - net(z_t, t, y) ||^2 (paper Eq. 2, with the target eps, x0 or v and
an optional min-SNR-gamma weight w). Class labels are dropped to a null class with probability
``label_dropout`` so that one network is both conditional and unconditional (classifier-free guidance).
"""

from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.functional.image import peak_signal_noise_ratio

from lightning_ldm.diffusion.guidance import cfg_model_fn
from lightning_ldm.diffusion.parameterization import Prediction, loss_weight, target_for
from lightning_ldm.diffusion.samplers import SamplerName, make_denoiser, sample
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError
from lightning_ldm.latent.cache import load_or_build_cache
from lightning_ldm.latent.first_stage import FrozenFirstStage
from lightning_ldm.latent.scale import estimate_scale_factor, ranks_agree
from lightning_ldm.training.acceleration import (channels_last_input, resolve_compile, training_on_gpu,
                                                 use_channels_last, use_cuda_graphs)
from lightning_ldm.training.base import StepCountingModule
from lightning_ldm.training.ema import EMA
from lightning_ldm.training.images import log_image_grid

Conditioning = Literal["none", "adm", "crossattn"]
DECODE_CHUNK = 32  # images decoded at once after sampling


class DiffusionModule(StepCountingModule):
    def __init__(
        self,
        *,
        first_stage: FrozenFirstStage,
        unet: Callable[..., torch.nn.Module],
        schedule: NoiseSchedule,
        image_size: int,
        prediction: Prediction = "eps",
        loss_type: Literal["l2", "l1"] = "l2",
        min_snr_gamma: Optional[float] = None,
        conditioning: Conditioning = "none",
        num_classes: Optional[int] = None,
        label_dropout: float = 0.1,
        max_steps: int = 1000,
        max_train_seconds: Optional[float] = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        scale_estimation_batches: int = 32,
        cache_latents: bool = False,
        cache_dir: Optional[str] = None,
        sampler: SamplerName = "dpmpp_2m",
        sampler_steps: int = 20,
        sampler_eta: Optional[float] = None,
        guidance_scale: float = 1.0,
        image_log_every: int = 500,
        num_log_images: int = 16,
        compile: Optional[bool] = None,
        cuda_graphs: bool = True,
    ) -> None:
        super().__init__(max_steps, max_train_seconds, lr=lr)
        if conditioning != "none" and not num_classes:
            raise ConfigError(f"module.conditioning={conditioning} needs module.num_classes (classes in the data)")
        if image_size % first_stage.downsampling_factor:
            raise ConfigError(f"image size {image_size} is not divisible by the first stage's downsampling factor "
                              f"f={first_stage.downsampling_factor}")
        self.first_stage = first_stage
        self.conditioning = conditioning
        self.num_classes = num_classes if conditioning != "none" else None
        self.null_class = self.num_classes  # the extra label index that means "no condition"
        channels = first_stage.latent_channels
        self.unet = unet(in_channels=channels, out_channels=channels, conditioning=conditioning,
                         num_classes=None if self.num_classes is None else self.num_classes + 1)
        self.ema = EMA(self.unet, decay=ema_decay, warmup=ema_warmup)
        self.schedule = schedule
        self.image_size = image_size
        self.latent_size = image_size // first_stage.downsampling_factor
        self.prediction = prediction
        self.loss_type = loss_type
        self.min_snr_gamma = min_snr_gamma
        self.label_dropout = label_dropout
        self.lr, self.weight_decay, self.adam_betas, self.warmup_steps = lr, weight_decay, tuple(adam_betas), warmup_steps
        self.scale_estimation_batches = scale_estimation_batches
        self.cache_latents, self.cache_dir = cache_latents, cache_dir
        self.sampler_settings = dict(name=sampler, steps=sampler_steps, eta=sampler_eta, guidance_scale=guidance_scale)
        self.image_log_every, self.num_log_images = image_log_every, num_log_images
        self.compile_setting = compile
        self.cuda_graphs_setting = cuda_graphs
        self.cuda_graphs = False  # decided in setup, with the device and the accumulation known
        self.channels_last = False
        self._accelerated = False
        self.rebuild_config = {  # everything a checkpoint needs to rebuild this module without a config file
            "first_stage": first_stage.export_config, "sample_posterior": first_stage.sample_posterior,
            "unet": self.unet.config, "schedule": schedule.config if hasattr(schedule, "config") else {
                k: getattr(schedule, k) for k in ("kind", "num_timesteps", "beta_start", "beta_end", "cosine_s")},
            "image_size": image_size, "prediction": prediction, "conditioning": conditioning,
            "num_classes": self.num_classes, "sampler": self.sampler_settings,
        }

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._accelerated:
            self._accelerated = True
            self.channels_last = training_on_gpu(self.trainer)
            if self.channels_last:
                use_channels_last(self.unet, self.ema.model, self.first_stage)
            if resolve_compile(self.compile_setting, self.trainer):
                # The trained copy only: its shapes never change, sampling's do. Whole, under DDP too: compiled stage
                # by stage (so gradient all-reduce could overlap the backward) the LDM-4 UNet trained 30% slower on
                # one GPU and compiled 2.2x longer (experiments/scaling/README.md).
                self.cuda_graphs = use_cuda_graphs(self.cuda_graphs_setting, self.trainer)
                self.unet.compile(mode="reduce-overhead" if self.cuda_graphs else None)
                if not self.cache_latents and self.first_stage.autoencoder is not None:
                    self.first_stage.autoencoder.encoder.compile()  # encoding every batch: as hot as the UNet
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or stage != "fit":
            return
        if datamodule.image_size != self.image_size:
            raise ConfigError(f"data.image_size={datamodule.image_size} differs from module.image_size={self.image_size}")
        if datamodule.channels != self.first_stage.image_channels:
            raise ConfigError(f"data has {datamodule.channels} channels, the first stage expects "
                              f"{self.first_stage.image_channels}")
        if hasattr(datamodule, "identity"):
            self.rebuild_config["data"] = datamodule.identity()  # lets evaluation check it compares like with like
        if self.num_classes and datamodule.num_classes and self.num_classes > datamodule.num_classes:
            raise ConfigError(f"module.num_classes={self.num_classes} but the data has {datamodule.num_classes} classes")

    def on_fit_start(self) -> None:
        # Here, not in setup(): a resumed run has restored the checkpoint's first stage by now, and the cache and
        # the scale must come from those weights, not from whatever export now sits at autoencoder.path.
        if self.cache_latents:
            self._use_latent_cache()
        self._report_first_stage()
        if not self.first_stage.scale_is_set:
            scale = estimate_scale_factor(self._scale_estimation_loader(), self._unscaled_latents,
                                          self.scale_estimation_batches, self.device)
            self.first_stage.scale_factor.fill_(scale)
        scale = float(self.first_stage.scale_factor)
        low, high = ranks_agree(scale, self.device)
        if low != high:  # a rank on another scale trains on differently scaled latents: the LD DDP bug
            raise RuntimeError(f"scale_factor differs across ranks: {low} .. {high}")
        if self.trainer.is_global_zero:
            world = self.trainer.world_size
            same = f" (identical on all {world} ranks)" if world > 1 else ""
            print(f"Stage 2: scale_factor {scale:.5f}{same}; lr {self.lr:g} (absolute, "
                  f"AdamW, {self.warmup_steps} warm-up steps); UNet {sum(p.numel() for p in self.unet.parameters()) / 1e6:.2f}M "
                  f"parameters; latents {self.first_stage.latent_channels}x{self.latent_size}x{self.latent_size}")

    def replicated_networks(self) -> dict[str, torch.nn.Module]:
        return {"UNet": self.unet, "EMA": self.ema.model}

    def _scale_estimation_loader(self) -> DataLoader:
        """Each rank reads different training batches (a distributed sampler), so more ranks see more data."""
        datamodule = self.trainer.datamodule
        dataset = datamodule.train_dataset
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
        return DataLoader(dataset, batch_size=datamodule.batch_size, sampler=sampler,
                          num_workers=getattr(datamodule, "num_workers", 0))

    def _use_latent_cache(self) -> None:
        datamodule = self.trainer.datamodule
        cache_dir = Path(self.cache_dir or Path(self.trainer.default_root_dir).parent / "latent_cache")
        dataset, _ = load_or_build_cache(self.first_stage, datamodule, cache_dir, self.device,
                                         is_global_zero=self.trainer.is_global_zero,
                                         barrier=self.trainer.strategy.barrier)
        datamodule.train_dataset = dataset  # read when the fit loop builds its train loader, after this hook

    @torch.no_grad()
    def _unscaled_latents(self, batch: dict) -> torch.Tensor:
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(self.device), batch["latent_std"].to(self.device)
        else:
            mean, std = self.first_stage.encode_distribution(batch["image"].to(self.device))
        if self.first_stage.sample_posterior and self.first_stage.regularizer == "kl":
            return mean + std * torch.randn_like(mean)
        return mean

    @torch.no_grad()
    def _report_first_stage(self) -> None:
        """Check the loaded autoencoder before spending compute on it: reconstruction PSNR of one batch."""
        if self.first_stage.autoencoder is None or not self.trainer.is_global_zero:
            return
        batch = next(iter(self.trainer.datamodule.val_dataloader()), None)
        if batch is None:  # val_fraction 0: nothing to check on
            return
        images = batch["image"][:32].to(self.device)
        with torch.autocast(self.device.type, enabled=False):
            mean, _ = self.first_stage.encode_distribution(images)
            recon = self.first_stage.autoencoder.decode(mean).clamp(-1, 1)
        psnr = peak_signal_noise_ratio((recon + 1) / 2, (images + 1) / 2, data_range=1.0)
        print(f"First stage check: reconstruction PSNR {float(psnr):.2f} dB on {images.shape[0]} validation images "
              f"({self.first_stage.source})")

    def configure_optimizers(self):
        # Fused: one kernel for all parameters, and it can skip a non-finite step on the device (nonfinite.py).
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                      betas=self.adam_betas, fused=True)
        warmup = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- training
    def latents_and_labels(self, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if "latent_mean" in batch:
            z = self.first_stage.scaled_latents(batch["latent_mean"], batch["latent_std"])
        else:
            z = self.first_stage.encode(channels_last_input(batch["image"], self.channels_last))
        labels = batch.get("label") if self.num_classes else None
        return channels_last_input(z, self.channels_last), labels

    def diffusion_loss(self, net: torch.nn.Module, z0: torch.Tensor, labels: Optional[torch.Tensor],
                       generator: Optional[torch.Generator] = None, drop_labels: bool = True) -> torch.Tensor:
        n = z0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (n,), device=z0.device, generator=generator)
        noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=generator)
        z_t = self.schedule.q_sample(z0, t, noise)
        y = None
        if labels is not None:
            y = labels
            if drop_labels and self.label_dropout > 0:
                drop = torch.rand(n, device=z0.device, generator=generator) < self.label_dropout
                y = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        output = net(z_t, t, y=y)
        alpha_bar = self.schedule.alpha_bar(t)
        target = target_for(self.prediction, z0, noise, alpha_bar)
        error = (output.float() - target.float())
        per_sample = (error.abs() if self.loss_type == "l1" else error.pow(2)).mean(dim=(1, 2, 3))
        weights = loss_weight(self.prediction, self.schedule.snr(t), self.min_snr_gamma)
        return (weights * per_sample).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        z0, labels = self.latents_and_labels(batch)
        loss = self.diffusion_loss(self.unet, z0, labels)
        self._loss_to_guard = loss
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=z0.shape[0])
        if self.batch_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
            self.log("train/ema_decay", self.ema.current_decay(), on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # After backward (and the DDP all-reduce), inside optimizer.step before the fused update reads found_inf.
        self.guard_step(optimizer, self._loss_to_guard, "diffusion")

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step, after the weights changed. After a step skipped as non-finite the weights did
        # not change, and the average takes its usual (finite) step towards them; the run stops soon after.
        self.ema.update(self.unet)

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z0, labels = self.latents_and_labels(batch)
        # Fixed t and noise per batch index so validation losses are comparable across evaluations.
        generator = torch.Generator(device=z0.device).manual_seed(1000 + batch_idx)
        loss = self.diffusion_loss(self.ema.model, z0, labels, generator=generator, drop_labels=False)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=z0.shape[0])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or not self.num_log_images:
            return
        generator = torch.Generator(device=self.device).manual_seed(0)  # same noise every time: comparable grids
        labels = None
        if self.num_classes:
            labels = torch.arange(self.num_log_images, device=self.device) % self.num_classes
        images, spec = self.generate(self.num_log_images, labels=labels, generator=generator)
        nrow = min(self.num_classes or 8, 8) if self.num_classes else 8
        log_image_grid(self.trainer, "val/samples", images, nrow=nrow, step=self.batch_step,
                       caption=f"EMA, {spec.name} {spec.steps} steps, guidance {self.sampler_settings['guidance_scale']}")

    # ----------------------------------------------------------------------------------------- sampling
    def prepare_for_sampling(self, compile: bool) -> None:
        """Fast inference on a GPU: channels_last for the sampling network (EMA) and the decoder, and optionally
        torch.compile of both (worth it for many batches of one shape: the sample stage, FID@50k)."""
        use_channels_last(self.ema.model, self.first_stage)
        if compile:
            self.ema.model.compile()
            if self.first_stage.autoencoder is not None:
                self.first_stage.autoencoder.decoder.compile()

    @torch.no_grad()
    def generate(self, n: int, *, labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
                 guidance_scale: Optional[float] = None, use_ema: bool = True, progress: bool = False,
                 x_T: Optional[torch.Tensor] = None):
        """n images in [-1, 1] (float32) and the sampler's spec."""
        settings = self.sampler_settings
        net = self.ema.model if use_ema else self.unet
        scale = settings["guidance_scale"] if guidance_scale is None else guidance_scale
        if self.num_classes:
            if labels is None:
                labels = torch.randint(0, self.num_classes, (n,), device=self.device, generator=generator)
            model_fn = cfg_model_fn(lambda x, t, y: net(x, t, y=y), labels.to(self.device), self.null_class, scale)
        else:
            model_fn = lambda x, t: net(x, t)  # noqa: E731
        denoise = make_denoiser(model_fn, self.schedule, self.prediction)
        shape = (n, self.first_stage.latent_channels, self.latent_size, self.latent_size)
        z, spec = sample(sampler or settings["name"], denoise, self.schedule, shape,
                         steps=steps or settings["steps"], eta=settings["eta"] if eta is None else eta,
                         generator=generator, device=self.device, x_T=x_T, progress=progress)
        return self.decode_latents(z), spec

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents to images in [-1, 1], in float32, decoded in the precision of the surrounding autocast
        (bf16-mixed on GPUs). A bf16 decode moves an 8-bit pixel by at most a level or two, two orders of magnitude
        below the autoencoder's own reconstruction error, and halves the decode's time: 28% of 50k-sample
        generation in float32 on an H100 (experiments/benchmarks/README.md). The reference's own text-to-image
        sampler decodes under autocast too; trainer.precision=32-true decodes (and samples) in float32."""
        # In chunks: a float32 f4 decoder holds ~0.5 GB of activations per 256^2 image (62.6 GB at batch 128 on an
        # H100), and a fixed chunk shape suits the compiled decoder; the result is the same.
        images = torch.cat([self.first_stage.decode(chunk) for chunk in z.split(DECODE_CHUNK)])
        return images.float().clamp(-1, 1)

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lightning_ldm"] = {"kind": "diffusion", "version": 1, "config": self.rebuild_config}
