"""Stage 2 training: a UNet learns to denoise the scaled latents of the frozen first stage, conditioned through
the conditioner's embedders tau_theta (paper Eq. 3; the loss is ``DenoisingLoss``). Each embedder drops its
condition to its null with its own rate, so one network is both conditional and unconditional (classifier-free
guidance).

The EMA averages the UNet *and* the trainable embedders together: the UNet was trained against the moving
encoder, so its average is paired with the encoder's average over the same steps, never with the latest
encoder. Frozen encoders (a pretrained CLIP text tower) are neither averaged nor optimised.
"""

import inspect
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.functional.image import peak_signal_noise_ratio

from lightning_ldm.conditioning.conditioner import Conditioner
from lightning_ldm.data.pairs import ImagePairs
from lightning_ldm.diffusion.guidance import guided_model_fn
from lightning_ldm.diffusion.loss import DenoisingLoss
from lightning_ldm.diffusion.parameterization import Prediction
from lightning_ldm.diffusion.image_inputs import latent_keep_mask
from lightning_ldm.diffusion.samplers import FromImage, SamplerSettings, make_denoiser, sample
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError
from lightning_ldm.latent.cache import CachedLatents
from lightning_ldm.latent.first_stage import FrozenFirstStage
from lightning_ldm.latent.scale import ranks_agree
from lightning_ldm.training.acceleration import (channels_last_input, resolve_compile, training_on_gpu,
                                                 use_channels_last, use_cuda_graphs)
from lightning_ldm.training.base import StepCountingModule
from lightning_ldm.training.ema import EMA
from lightning_ldm.training.images import log_image_grid, log_prompt_table

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
        conditioning: Optional[Mapping[str, Mapping[str, Any]]] = None,
        validation_prompts: Optional[Sequence[str]] = None,
        max_steps: int = 1000,
        max_train_seconds: Optional[float] = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        scale_estimation_batches: int = 32,
        cache_latents: Optional[bool] = False,
        cache_dir: Optional[str] = None,
        sampling: Optional[Mapping[str, Any]] = None,
        image_log_every: int = 500,
        num_log_images: int = 16,
        compile: Optional[bool] = None,
        cuda_graphs: bool = True,
        init_from: Optional[str] = None,
    ) -> None:
        super().__init__(max_steps, max_train_seconds, lr=lr)
        if isinstance(conditioning, str):
            raise ConfigError(f"module.conditioning={conditioning!r} is the old form: choose the config group "
                              "conditioning=class (ADM), conditioning=class_crossattn, conditioning=text, ...")
        if image_size % first_stage.downsampling_factor:
            raise ConfigError(f"image size {image_size} is not divisible by the first stage's downsampling factor "
                              f"f={first_stage.downsampling_factor}")
        self.first_stage = first_stage
        model_channels = inspect.signature(unet).parameters["model_channels"].default
        self.conditioner = Conditioner.from_spec(conditioning, vector_dim=4 * model_channels, first_stage=first_stage)
        given_context = getattr(unet, "keywords", {}).get("context_dim")
        if given_context is not None and given_context != self.conditioner.context_dim:
            raise ConfigError(f"unet.context_dim={given_context} but the conditioning produces "
                              f"{self.conditioner.context_dim or 'no context'}: the width comes from the embedders "
                              "(remove unet.context_dim)")
        channels = first_stage.latent_channels
        self.unet = unet(in_channels=channels, out_channels=channels, context_dim=self.conditioner.context_dim,
                         concat_channels=self.conditioner.concat_channels)
        if init_from:  # a new run from another model's weights (tasks/train.py drops it when resuming)
            from lightning_ldm.interop.initialise import initialise_from

            print(f"Initial weights: {initialise_from(init_from, self.unet, self.conditioner)}")
        self.ema = EMA(self.trained_networks(), decay=ema_decay, warmup=ema_warmup)
        self.validation_prompts = list(validation_prompts) if validation_prompts else None
        self.evaluation_prompts: Optional[list[str]] = None  # FID's prompts: every validation image's first caption
        self.schedule = schedule
        self.image_size = image_size
        self.latent_size = image_size // first_stage.downsampling_factor
        self.prediction = prediction
        self.loss = DenoisingLoss(schedule, prediction, loss_type, min_snr_gamma)
        self.lr, self.weight_decay, self.adam_betas, self.warmup_steps = lr, weight_decay, tuple(adam_betas), warmup_steps
        self.scale_estimation_batches = scale_estimation_batches
        self.cache_latents, self.cache_dir = cache_latents, cache_dir  # None: decided by wrap_data
        self.sampling = SamplerSettings.from_config(sampling)
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
            "image_size": image_size, "prediction": prediction, "conditioning": self.conditioner.spec,
            "sampling": self.sampling.as_dict(),
        }

    def trained_networks(self) -> nn.ModuleDict:
        """What the optimizer and the EMA cover: the UNet and the conditioner (whose frozen encoders hold no
        parameters of the module tree). A fresh container each call, so no module is registered twice."""
        return nn.ModuleDict({"unet": self.unet, "conditioner": self.conditioner})

    @property
    def num_classes(self) -> Optional[int]:
        return self.conditioner.num_classes

    @property
    def image_task(self) -> Optional[str]:
        """"super_resolution" or "inpainting" for a model conditioned on an image, else None."""
        if self.conditioner.embedder("low_res") is not None:
            return "super_resolution"
        return "inpainting" if self.conditioner.embedder("inpainting") is not None else None

    def wrap_data(self, datamodule):
        """The data this module trains on: image data as configured, wrapped to serve cached latents
        (``cache_latents``) or the pairs an image condition trains on (super-resolution, inpainting)."""
        makers = self.conditioner.pair_makers()
        if self.cache_latents is None:  # cache unless conditions are drawn from the pixels each step
            self.cache_latents = not makers
        if makers and self.cache_latents:
            raise ConfigError(f"module.cache_latents=true cannot train {self.image_task.replace('_', '-')}: its "
                              "conditions are drawn afresh from the pixels every step (set module.cache_latents=false)")
        if makers:
            return ImagePairs(datamodule, makers)
        return CachedLatents(datamodule, self.cache_dir) if self.cache_latents else datamodule

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.cache_latents and not isinstance(datamodule, CachedLatents):
            raise ConfigError("module.cache_latents=true, but the data is not wrapped: train with "
                              "datamodule=module.wrap_data(data) (the command line does this)")
        if stage == "fit" and self.image_task and not isinstance(datamodule, ImagePairs):
            raise ConfigError(f"{self.image_task.replace('_', '-')} trains on pairs made from the images: train with "
                              "datamodule=module.wrap_data(data) (the command line does this)")
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
                if not isinstance(datamodule, CachedLatents) and self.first_stage.autoencoder is not None:
                    self.first_stage.autoencoder.encoder.compile()  # encoding every batch: as hot as the UNet
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
            raise ConfigError(f"the class embedder has num_classes={self.num_classes} but the data has "
                              f"{datamodule.num_classes} classes")
        if self.conditioner.reads_text and not getattr(datamodule, "captioned", False):
            raise ConfigError(f"text conditioning needs captions, and data {datamodule.name} has none: add "
                              "metadata.jsonl (file_name, text) or a .txt beside each image, or choose "
                              "conditioning=none / class")

    def on_fit_start(self) -> None:
        # Here, not in setup(): a resumed run has restored the checkpoint's first stage by now, and the cache and
        # the scale must come from those weights, not from whatever export now sits at autoencoder.path.
        self._prepare_conditioner()
        self._report_first_stage()
        scale = self.first_stage.fit_scale(self._scale_estimation_loader(), self.scale_estimation_batches, self.device)
        if self.trainer.is_global_zero:
            world = self.trainer.world_size
            same = f" (identical on all {world} ranks)" if world > 1 else ""
            print(f"Stage 2: scale_factor {scale:.5f}{same}; lr {self.lr:g} (absolute, "
                  f"AdamW, {self.warmup_steps} warm-up steps); UNet {sum(p.numel() for p in self.unet.parameters()) / 1e6:.2f}M "
                  f"parameters; latents {self.first_stage.latent_channels}x{self.latent_size}x{self.latent_size}")

    def _prepare_conditioner(self) -> None:
        """Train what the embedders learn from the data (a tokenizer) unless a checkpoint restored it; every rank
        trains on the same captions, and the ranks must agree on the result (token ids are the encoder's input)."""
        self.conditioner.prepare(self.trainer.datamodule, progress=self.trainer.is_global_zero)
        self.ema.model["conditioner"].share_state(self.conditioner)
        text = self.conditioner.embedder("text")
        if text is not None and text.tokenizer is not None:
            fingerprint = float(int(text.tokenizer.fingerprint[:12], 16))
            low, high = ranks_agree(fingerprint, self.device)
            if low != high:
                raise RuntimeError("the ranks trained different tokenizers from the same captions")
        if self.conditioner.reads_text:
            view = self.trainer.datamodule.val_dataset
            captions = view.first_captions() if view is not None else []
            self.evaluation_prompts = captions or None
            if not self.validation_prompts:  # one per logged image, fixed by the split
                self.validation_prompts = captions[:self.num_log_images] or [""]

    def replicated_networks(self) -> dict[str, torch.nn.Module]:
        trained_conditioner = {"conditioner": self.conditioner} if self.conditioner.trainable_parameters() else {}
        return {"UNet": self.unet, **trained_conditioner, "EMA": self.ema.model}

    def _scale_estimation_loader(self) -> DataLoader:
        """Each rank reads different training batches (a distributed sampler), so more ranks see more data."""
        datamodule = self.trainer.datamodule
        dataset = datamodule.latents() if isinstance(datamodule, CachedLatents) else datamodule.train_dataset
        if isinstance(dataset, torch.utils.data.IterableDataset):  # streamed shards split across ranks themselves
            return datamodule.train_dataloader()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
        return DataLoader(dataset, batch_size=datamodule.batch_size, sampler=sampler,
                          num_workers=getattr(datamodule, "num_workers", 0))

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
        parameters = [p for p in self.trained_networks().parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay,
                                      betas=self.adam_betas, fused=True)
        warmup = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- training
    def latents(self, batch: dict) -> torch.Tensor:
        if "latent_mean" in batch:
            z = self.first_stage.scaled_latents(batch["latent_mean"], batch["latent_std"])
        else:
            z = self.first_stage.encode(channels_last_input(batch["image"], self.channels_last))
        return channels_last_input(z, self.channels_last)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        z0 = self.latents(batch)
        cond = self.conditioner(self.conditioner.inputs(batch), self.device, drop=True)
        loss = self.loss(self.unet, z0, cond)
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
        self.ema.update(self.trained_networks())

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z0 = self.latents(batch)
        averaged = self.ema.model
        cond = averaged["conditioner"](averaged["conditioner"].inputs(batch), self.device)
        # Fixed t and noise per batch index so validation losses are comparable across evaluations.
        generator = torch.Generator(device=z0.device).manual_seed(1000 + batch_idx)
        loss = self.loss(averaged["unet"], z0, cond, generator=generator)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=z0.shape[0])
        if batch_idx == 0 and self.image_task:  # the grid's inputs: validation's pairs are fixed, so is the grid
            keys = ("image", "low_res", "mask", "label", "caption")
            self._grid_batch = {k: batch[k][:self.num_log_images] for k in keys if k in batch}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or not self.num_log_images:
            return
        if self.image_task:
            return self._log_image_task_grid()
        generator = torch.Generator(device=self.device).manual_seed(0)  # same noise every time: comparable grids
        labels = prompts = None
        if self.num_classes:
            labels = torch.arange(self.num_log_images, device=self.device) % self.num_classes
        if self.conditioner.reads_text:
            pool = self.validation_prompts or [""]
            prompts = [pool[i % len(pool)] for i in range(self.num_log_images)]
        images, spec = self.generate(self.num_log_images, labels=labels, prompts=prompts, generator=generator)
        nrow = min(self.num_classes or 8, 8) if self.num_classes else 8
        caption = f"EMA, {spec.name} {spec.steps} steps, guidance {self.sampling.guidance_scale}"
        log_image_grid(self.trainer, "val/samples", images, nrow=nrow, step=self.batch_step, caption=caption)
        if prompts:
            log_prompt_table(self.trainer, "val/prompts", images, prompts, step=self.batch_step)

    def _log_image_task_grid(self) -> None:
        """Each fixed validation pair as a row: the input, the output, the target."""
        batch = getattr(self, "_grid_batch", None)
        if batch is None:
            return
        target = batch["image"].to(self.device, torch.float32)
        n = target.shape[0]
        generator = torch.Generator(device=self.device).manual_seed(0)
        labels = batch["label"].to(self.device) if self.num_classes and "label" in batch else None
        prompts = list(batch["caption"]) if self.conditioner.reads_text and "caption" in batch else None
        if self.image_task == "super_resolution":
            low_res = batch["low_res"].to(self.device, torch.float32)
            output, spec = self.generate(n, labels=labels, prompts=prompts, generator=generator, low_res=low_res)
            shown_input = F.interpolate(low_res, size=target.shape[-2:], mode="nearest")
        else:
            keep = 1 - batch["mask"].to(self.device, torch.float32)
            output, spec = self.generate(n, labels=labels, prompts=prompts, generator=generator, image=target,
                                         keep=keep)
            shown_input = target * keep  # the generated region grey
        rows = torch.stack([shown_input, output, target], dim=1).flatten(0, 1)
        caption = f"input | output | target; EMA, {spec.name} {spec.steps} steps"
        log_image_grid(self.trainer, "val/samples", rows, nrow=3, step=self.batch_step, caption=caption)

    # ----------------------------------------------------------------------------------------- sampling
    def prepare_for_sampling(self, compile: bool) -> None:
        """Fast inference on a GPU: channels_last for the sampling network (EMA) and the decoder, and optionally
        torch.compile of both (worth it for many batches of one shape: the sample stage, FID@50k)."""
        use_channels_last(self.ema.model, self.first_stage)
        if compile:
            self.ema.model["unet"].compile()
            if self.first_stage.autoencoder is not None:
                self.first_stage.autoencoder.decoder.compile()

    @torch.no_grad()
    def generate(self, n: int, *, labels: Optional[torch.Tensor] = None, prompts: Optional[Sequence[str]] = None,
                 negative_prompt: Optional[str] = None, generator: Optional[torch.Generator] = None,
                 sampler: Optional[str] = None, steps: Optional[int] = None, eta: Optional[float] = None,
                 guidance_scale: Optional[float] = None, use_ema: bool = True, progress: bool = False,
                 x_T: Optional[torch.Tensor] = None, image: Optional[torch.Tensor] = None, strength: float = 1.0,
                 keep: Optional[torch.Tensor] = None, low_res: Optional[torch.Tensor] = None):
        """n images in [-1, 1] (float32) and the sampler's spec. Class labels default to random classes; a
        text-conditioned model needs ``prompts`` (n of them); ``negative_prompt`` replaces the empty caption of
        guidance's unconditional branch.

        From an input ``image`` (n, C, H, W) in [-1, 1], any model: ``strength`` < 1 is image-to-image (SDEdit,
        from its latents noised part of the way), and ``keep`` (n, 1, H, W), 1 where the input stays, inpaints:
        a model trained to inpaint is conditioned on the masked image; any other model by replacing the known
        latents at every step. Either way the kept pixels of the result are the input's exactly. A
        super-resolution model reads ``low_res`` (n, C, h, w) and makes images ``factor`` times larger."""
        settings = self.sampling
        networks = self.ema.model if use_ema else self.trained_networks()
        conditioner, net = networks["conditioner"], networks["unet"]
        inputs, negative = self._condition_inputs(conditioner, n, labels, prompts, negative_prompt, generator,
                                                  image=image, keep=keep, low_res=low_res)
        cond, uncond = conditioner.guidance_inputs(inputs, self.device, negative) if inputs else ({}, {})
        scale = settings.guidance_scale if guidance_scale is None else guidance_scale
        denoise = make_denoiser(guided_model_fn(net, cond, uncond, scale), self.schedule, self.prediction)
        from_image = None
        factor = self.first_stage.downsampling_factor
        shape = (n, *self.latent_shape(image=image, low_res=low_res))
        if image is not None:
            image = image.to(self.device, torch.float32)
            # A trained inpainting model is told what to keep; replacement is for models that were not.
            replace = keep is not None and self.image_task != "inpainting"
            latent_keep = latent_keep_mask(keep.to(self.device, torch.float32), factor) if replace else None
            if strength < 1 or replace:
                from_image = FromImage(self.first_stage.encode_mean(image), strength, latent_keep)
        z, spec = sample(sampler or settings.sampler, denoise, self.schedule, shape,
                         steps=steps or settings.steps, eta=settings.eta if eta is None else eta,
                         generator=generator, device=self.device, x_T=x_T, progress=progress, image=from_image)
        images = self.decode_latents(z)
        if keep is not None:
            keep = keep.to(images.device, images.dtype)
            images = keep * image.to(images.dtype) + (1 - keep) * images
        return images, spec

    def latent_shape(self, *, image: Optional[torch.Tensor] = None,
                     low_res: Optional[torch.Tensor] = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents ``generate`` samples: the model's own size; an input ``image``'s size divided
        by the first stage's factor; or, for a super-resolution model, the size its ``low_res`` input becomes."""
        channels, factor = self.first_stage.latent_channels, self.first_stage.downsampling_factor
        if image is not None:
            return channels, image.shape[-2] // factor, image.shape[-1] // factor
        if low_res is not None:
            embedder = self.conditioner.embedder("low_res")
            return channels, embedder.latent_size(low_res.shape[-2]), embedder.latent_size(low_res.shape[-1])
        return channels, self.latent_size, self.latent_size

    def _condition_inputs(self, conditioner: Conditioner, n: int, labels, prompts, negative_prompt, generator, *,
                          image=None, keep=None, low_res=None):
        inputs, negative = {}, {}
        task = self.image_task
        if low_res is not None and task != "super_resolution":
            raise ConfigError(f"this model ({self.describe_conditioning()}) was not trained to super-resolve: "
                              "train one with conditioning=super_resolution")
        for name, embedder in conditioner.embedders.items():
            if embedder.kind == "low_res":
                if low_res is None:
                    raise ConfigError("this model super-resolves: give low-resolution input images (sample.images=...)")
                inputs[name] = low_res.to(self.device)
                continue
            if embedder.kind == "inpainting":
                if image is None or keep is None:
                    raise ConfigError("this model inpaints: give images and masks (sample.images=... sample.masks=...)")
                inputs[name] = {"image": image.to(self.device), "mask": 1 - keep.to(self.device, image.dtype)}
                continue
            if embedder.kind == "class":
                if labels is None:
                    labels = torch.randint(0, embedder.num_classes, (n,), device=self.device, generator=generator)
                inputs[name] = labels.to(self.device)
            elif embedder.input_key == "caption":
                if prompts is None or len(prompts) != n:
                    raise ConfigError(f"this model is text-conditioned: give {n} prompts "
                                      "(sample.prompts=[...] or sample.prompt_file=<file>)")
                inputs[name] = list(prompts)
                if negative_prompt:
                    negative[name] = [negative_prompt] * n
            else:
                raise ConfigError(f"sampling does not know how to feed the {embedder.kind!r} embedder {name!r}")
        if prompts is not None and not conditioner.reads_text:
            raise ConfigError("prompts were given but this model is not text-conditioned")
        return inputs, negative

    def describe_conditioning(self) -> str:
        kinds = [e.kind for e in self.conditioner.embedders.values()]
        return "conditioned on " + ", ".join(kinds) if kinds else "unconditional"

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
        checkpoint["lightning_ldm"] = {"kind": "diffusion", "version": 2, "config": self.rebuild_config}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        from lightning_ldm.diffusion.legacy import upgrade_state_dict

        meta = checkpoint.get("lightning_ldm") or {}
        if meta.get("version", 1) < 2 and "state_dict" in checkpoint:
            checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"], self.conditioner)
