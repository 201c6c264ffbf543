"""Stage-1 losses: LPIPS, the PatchGAN discriminator and the combined autoencoder loss."""

from lightning_ldm.losses.autoencoder_loss import AutoencoderLoss
from lightning_ldm.losses.discriminator import PatchDiscriminator, hinge_d_loss, vanilla_d_loss
from lightning_ldm.losses.lpips import FrozenLPIPS, find_vgg16_weights, load_lpips

__all__ = [
    "AutoencoderLoss",
    "FrozenLPIPS",
    "PatchDiscriminator",
    "find_vgg16_weights",
    "hinge_d_loss",
    "load_lpips",
    "vanilla_d_loss",
]
