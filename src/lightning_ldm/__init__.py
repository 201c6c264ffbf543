"""lightning_ldm: Latent Diffusion Models trained end to end with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
