"""Stage-1 loss: reconstruction + LPIPS + KL/VQ regulariser + patch-adversarial term with the adaptive weight.

Follows LD's LPIPSWithDiscriminator / VQLPIPSWithDiscriminator (Rombach et al. 2022, Sec. 3.1 and App. G;
Esser et al. 2021, Eq. 7), with two deliberate differences: nothing of the discriminator runs before
`disc_start` (LD computes it and multiplies by zero), and the log-variance is optimised when asked to be.
"""

from typing import Literal, Optional

import torch
from torch import nn

from lightning_ldm.errors import ConfigError
from lightning_ldm.losses.discriminator import NormKind, PatchDiscriminator, hinge_d_loss, vanilla_d_loss
from lightning_ldm.losses.lpips import load_lpips

_GRAD_NORM_EPS = 1e-4
_MAX_D_WEIGHT = 1e4


class AutoencoderLoss(nn.Module):
    """Holds the PatchGAN discriminator and the frozen LPIPS network; computes the generator and D losses.

    `step` arguments count *batches* (the caller's own counter): Lightning's global_step advances once per
    optimizer.step(), i.e. twice per batch with G and D, which would silently double `disc_start`.
    """

    def __init__(
        self,
        *,
        image_channels: int = 3,
        pixel_loss: Literal["l1", "l2"] = "l1",
        perceptual_weight: float = 1.0,
        lpips_weights: Optional[str] = None,
        nll_reduction: Literal["sum", "mean"] = "sum",
        kl_weight: float = 1e-6,
        codebook_weight: float = 1.0,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_loss: Literal["hinge", "vanilla"] = "hinge",
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_norm: NormKind = "batch",
    ) -> None:
        super().__init__()
        _check_choice("pixel_loss", pixel_loss, ("l1", "l2"))
        _check_choice("nll_reduction", nll_reduction, ("sum", "mean"))
        _check_choice("disc_loss", disc_loss, ("hinge", "vanilla"))
        for name, value in (("perceptual_weight", perceptual_weight), ("kl_weight", kl_weight),
                            ("codebook_weight", codebook_weight), ("disc_weight", disc_weight),
                            ("disc_factor", disc_factor)):
            if value < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {value}")
        if perceptual_weight > 0 and image_channels not in (1, 3):
            raise ConfigError(f"loss.perceptual_weight > 0 needs RGB or greyscale images (LPIPS is an RGB "
                              f"network), got image_channels={image_channels}: set loss.perceptual_weight=0")

        self.image_channels = image_channels
        self.pixel_loss = pixel_loss
        self.perceptual_weight = perceptual_weight
        self.nll_reduction = nll_reduction
        self.kl_weight = kl_weight
        self.codebook_weight = codebook_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.d_loss_fn = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss

        # Loaded at construction so that a missing VGG file stops the run before any training happens.
        self.uses_lpips = perceptual_weight > 0
        # Held outside the module tree: its 14.7M frozen weights come from the VGG file at every construction,
        # so they stay out of every checkpoint (59 MB each) and out of DDP's parameter lists.
        self._frozen = {"lpips": load_lpips(lpips_weights)} if self.uses_lpips else {}
        # Scalar log-variance of a Laplace (l1) / Gaussian (l2) likelihood: nll = rec / exp(logvar) + logvar.
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.discriminator = PatchDiscriminator(in_channels=image_channels, ndf=disc_ndf, n_layers=disc_layers,
                                                norm=disc_norm)

    @property
    def lpips(self) -> Optional[nn.Module]:
        return self._frozen.get("lpips")

    def generator_parameters(self) -> list[nn.Parameter]:
        """Trainable loss parameters that belong in the autoencoder's optimizer (the logvar, if learnable)."""
        return [self.logvar] if self.logvar.requires_grad else []

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def discriminator_active(self, step: int) -> bool:
        return step >= self.disc_start

    def perceptual_distance(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """LPIPS per image, shape (N, 1, 1, 1); greyscale is repeated to the 3 channels VGG expects."""
        assert self.lpips is not None, "perceptual_weight is 0: no LPIPS network was loaded"
        if x.shape[1] == 1:
            x, x_hat = x.expand(-1, 3, -1, -1), x_hat.expand(-1, 3, -1, -1)
        if next(self.lpips.parameters()).device != x.device:  # not moved by .to(): it is outside the tree
            self.lpips.to(x.device)
        return self.lpips(x, x_hat)

    def reconstruction_nll(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reduced nll of the reconstruction, and its parts for logging."""
        # In float32: a bf16 sum over N*3*256*256 elements keeps ~3 significant digits.
        x, x_hat = x.float(), x_hat.float()
        diff = x - x_hat
        pixel = diff.abs() if self.pixel_loss == "l1" else diff.square()
        logs = {"pixel_loss": pixel.detach().mean()}
        rec = pixel
        if self.uses_lpips:
            perceptual = self.perceptual_distance(x, x_hat).float()
            rec = rec + self.perceptual_weight * perceptual  # one distance per image, counted at every pixel (LD)
            logs["perceptual_loss"] = perceptual.detach().mean()
        nll = rec / torch.exp(self.logvar) + self.logvar
        if self.nll_reduction == "sum":
            # LD's KL convention: sum over C,H,W, mean over the batch; kl_weight=1e-6 is calibrated to this scale.
            nll = nll.sum() / nll.shape[0]
        else:
            nll = nll.mean()  # LD's VQ convention
        logs["rec_loss"] = rec.detach().mean()
        logs["nll_loss"] = nll.detach()
        return nll, logs

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: nn.Parameter) -> torch.Tensor:
        """lambda = ||grad_L nll|| / (||grad_L g_loss|| + 1e-4), clamped, detached, times disc_weight (Esser Eq. 7).

        Balances the GAN gradient against the reconstruction gradient at the decoder's last layer L. Without
        a graph (validation under no_grad) the weight is 0, as in the reference.
        """
        if not (torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad and last_layer.requires_grad):
            return torch.zeros((), device=nll.device)
        (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
        (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
        weight = nll_grad.norm() / (g_grad.norm() + _GRAD_NORM_EPS)
        return weight.clamp(0.0, _MAX_D_WEIGHT).detach() * self.disc_weight

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        regularization_loss: torch.Tensor,
        regularizer: Literal["kl", "vq"],
        last_layer: nn.Parameter,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder objective: nll + weighted regulariser + (once active) d_weight * disc_factor * g_loss.

        `regularization_loss` is the KL already summed over latent elements and averaged over the batch
        ("kl"), or the VQ codebook + commitment loss ("vq"). `last_layer` is the decoder's final conv weight.
        Logs are detached; g_loss and d_weight are logged as 0 while the discriminator is off.
        """
        if regularizer == "kl":
            reg_weight = self.kl_weight
        elif regularizer == "vq":
            reg_weight = self.codebook_weight
        else:
            raise ValueError(f"regularizer must be 'kl' or 'vq', got {regularizer!r}")

        nll, logs = self.reconstruction_nll(x, x_hat)
        total = nll + reg_weight * regularization_loss
        g_loss = d_weight = torch.zeros((), device=nll.device)
        if self.discriminator_active(step):
            g_loss = -self.discriminator(x_hat).mean()
            d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            total = total + d_weight * self.disc_factor * g_loss

        logs[f"{regularizer}_loss"] = regularization_loss.detach()
        logs["g_loss"] = g_loss.detach()
        logs["d_weight"] = d_weight.detach()
        logs["logvar"] = self.logvar.detach()
        logs["total_loss"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor * (hinge or vanilla) loss of D on real x and detached reconstructions x_hat."""
        if not self.discriminator_active(step):
            raise RuntimeError(f"discriminator_loss called at step {step} < disc_start {self.disc_start}")
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_hat.detach())
        d_loss = self.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"loss.{name} must be one of {', '.join(choices)}; got {value!r}")
