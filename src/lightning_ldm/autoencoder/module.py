"""Stage 1 training: the perceptual autoencoder with manual optimisation of generator and discriminator.

Both optimisers step on every batch once the discriminator is active (as the reference LD code does; SGM
alternates batches instead), after one backward pass through the sum of both losses. Before ``disc_start`` only
the generator runs: no discriminator forward, no adaptive-weight gradients. Gradient accumulation and clipping
are done here by hand because Lightning does neither under manual optimisation.
"""

from typing import Optional

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from lightning_ldm.autoencoder.model import Autoencoder
from lightning_ldm.errors import ConfigError
from lightning_ldm.losses.autoencoder_loss import AutoencoderLoss
from lightning_ldm.training.acceleration import (channels_last_input, resolve_compile, training_on_gpu,
                                                 use_channels_last)
from lightning_ldm.training.base import StepCountingModule
from lightning_ldm.training.images import log_image_grid


class AutoencoderModule(StepCountingModule):
    def __init__(
        self,
        *,
        autoencoder: Autoencoder,
        loss: AutoencoderLoss,
        max_steps: int = 1000,
        max_train_seconds: Optional[float] = None,
        lr: float = 4.5e-6,
        adam_betas: tuple[float, float] = (0.5, 0.9),
        accumulate_grad_batches: int = 1,
        grad_clip_norm: Optional[float] = None,
        sample_posterior: bool = True,
        image_log_every: int = 500,
        num_log_images: int = 8,
        compile: Optional[bool] = None,
    ) -> None:
        super().__init__(max_steps, max_train_seconds, lr=lr)
        if accumulate_grad_batches < 1:
            raise ConfigError(f"module.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.autoencoder = autoencoder
        self.loss = loss
        self.lr = lr  # absolute: the optimiser uses exactly this value, whatever the batch or device count
        self.adam_betas = tuple(adam_betas)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.grad_clip_norm = grad_clip_norm
        self.sample_posterior = sample_posterior
        self.image_log_every = image_log_every
        self.num_log_images = num_log_images
        self.automatic_optimization = False
        self._logged_image_step = -1
        self.compile_setting = compile
        self.channels_last = False
        self._accelerated = False

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._accelerated:
            self._accelerated = True
            self.channels_last = training_on_gpu(self.trainer)
            if self.channels_last:
                use_channels_last(self.autoencoder, self.loss)
            if resolve_compile(self.compile_setting, self.trainer):
                # The encoder whole; the decoder without its last conv, whose weight gradient the adaptive GAN
                # weight takes twice per batch (a compiled last layer would rerun the whole decoder backward).
                self.autoencoder.encoder.compile()
                self.autoencoder.decoder.features = torch.compile(self.autoencoder.decoder.features)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        f = self.autoencoder.downsampling_factor
        if datamodule.image_size % f:
            raise ConfigError(
                f"data.image_size={datamodule.image_size} is not divisible by the autoencoder's downsampling "
                f"factor f={f}; choose an image size that is a multiple of {f}"
            )
        if datamodule.channels != self.autoencoder.config["in_channels"]:
            raise ConfigError(
                f"data has {datamodule.channels} channels but autoencoder.in_channels="
                f"{self.autoencoder.config['in_channels']}"
            )

    def replicated_networks(self) -> dict[str, torch.nn.Module]:
        return {"autoencoder": self.autoencoder, "discriminator": self.loss.discriminator}

    def configure_optimizers(self):
        generator = list(self.autoencoder.parameters()) + list(self.loss.generator_parameters())
        # Fused: one kernel per optimizer, and it can skip a non-finite step on the device (nonfinite.py).
        opt_g = torch.optim.Adam(generator, lr=self.lr, betas=self.adam_betas, fused=True)
        opt_d = torch.optim.Adam(self.loss.discriminator_parameters(), lr=self.lr, betas=self.adam_betas, fused=True)
        return [opt_g, opt_d]

    def on_fit_start(self) -> None:
        world = self.trainer.world_size
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        if self.trainer.is_global_zero:
            global_batch = f"{batch} x {world} device(s) x {self.accumulate_grad_batches} accumulation" if batch else "?"
            disc_start = self.loss.disc_start
            adversarial = (f"discriminator off (disc_start {disc_start} >= max_steps {self.max_steps})"
                           if disc_start >= self.max_steps else f"discriminator from batch {disc_start}")
            print(f"Stage 1: lr {self.lr:g} (absolute, not scaled by batch); global batch {global_batch}; "
                  f"{adversarial}; LPIPS {'on' if self.loss.uses_lpips else 'off (perceptual_weight=0)'}")

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = channels_last_input(batch["image"], self.channels_last)
        opt_g, opt_d = self.optimizers()
        step = self.batch_step
        steps_now = (step + 1) % self.accumulate_grad_batches == 0

        # Generator loss with the discriminator frozen (toggle_optimizer): its path through D reaches the
        # reconstruction, never D's weights.
        self.toggle_optimizer(opt_g)
        out = self.autoencoder(x, sample_posterior=self.sample_posterior)
        g_loss, g_logs = self.loss.generator_loss(
            x, out.reconstruction, out.regularization_loss, self.autoencoder.regularizer,
            self.autoencoder.last_layer(), step)
        self.untoggle_optimizer(opt_g)
        logs = {**g_logs, **out.log}

        # One backward pass for both networks. Their gradients cannot mix: g_loss reaches no D weight and
        # d_loss sees the reconstruction detached, so each network gets exactly the gradient of its own loss, as
        # with one backward pass per loss. Under DDP this all-reduces each gradient once per batch instead of the
        # whole gradient twice. Before disc_start D takes no part, yet every D weight still gets a (zero)
        # gradient: that lets DDP run without find_unused_parameters, whose reducer copies its map of used
        # parameters to the host, a GPU sync, after every backward pass in which some parameter got none.
        adversarial = self.loss.discriminator_active(step)
        if adversarial:
            d_loss, d_logs = self.loss.discriminator_loss(x, out.reconstruction.detach(), step)
            logs.update(d_logs)
            both = g_loss + d_loss
        else:
            both = g_loss + sum(p.sum() for p in self.loss.discriminator_parameters()) * 0.0
        self.manual_backward(both / self.accumulate_grad_batches)
        if steps_now:
            self._step(opt_g, g_loss, "generator")
            if adversarial:
                self._step(opt_d, d_loss, "discriminator")
            else:
                opt_d.zero_grad(set_to_none=True)

        shown = logs.pop("rec_loss")
        self.log("train/rec_loss", shown, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False,
                      batch_size=x.shape[0])
        self.log_learning_rates({"g": opt_g.optimizer, "d": opt_d.optimizer})
        if self.image_log_every and step % self.image_log_every == 0 and self.trainer.is_global_zero:
            self._log_reconstructions(x, out.reconstruction, "train/reconstructions")

    def _step(self, optimizer, loss: torch.Tensor, name: str) -> None:
        if self.grad_clip_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm")
        self.guard_step(optimizer, loss, name)  # a non-finite step is skipped on the device, reported 2 batches on
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        out = self.autoencoder(x, sample_posterior=False)
        x_hat = out.reconstruction.float().clamp(-1, 1)
        x01, xhat01 = (x.float() + 1) / 2, (x_hat + 1) / 2
        metrics = {
            "rec_loss": (x.float() - x_hat).abs().mean(),
            "psnr": peak_signal_noise_ratio(xhat01, x01, data_range=1.0),
            "ssim": structural_similarity_index_measure(xhat01, x01, data_range=1.0),
        }
        if self.loss.uses_lpips:
            metrics["lpips"] = self.loss.perceptual_distance(x, x_hat).mean()
        metrics.update({k: v for k, v in out.log.items()})
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_epoch=True, sync_dist=True,
                      batch_size=x.shape[0])
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._log_reconstructions(x, x_hat, "val/reconstructions")

    def _log_reconstructions(self, x: torch.Tensor, x_hat: torch.Tensor, key: str) -> None:
        n = min(self.num_log_images, x.shape[0])
        # Row pairs: originals on top, reconstructions below.
        pairs = torch.cat([x[:n].float(), x_hat[:n].float()])
        log_image_grid(self.trainer, key, pairs, nrow=n, step=self.batch_step,
                       caption="top: input, bottom: reconstruction")
