"""Stage-1 perceptual autoencoder (KL- or VQ-regularised) that maps images to the latent space of the LDM."""

from lightning_ldm.autoencoder.model import PAPER_PRESETS, SMALL_PRESETS, Autoencoder, AutoencoderOutput

__all__ = ["PAPER_PRESETS", "SMALL_PRESETS", "Autoencoder", "AutoencoderOutput"]
