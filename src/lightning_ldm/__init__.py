"""lightning_ldm: Latent Diffusion Models trained end to end with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
__all__ = ["load_pipeline"]


def __getattr__(name: str):
    # lazily, so that `python -m lightning_ldm --help` and config tools need not import torch first
    if name == "load_pipeline":
        from lightning_ldm.pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'lightning_ldm' has no attribute {name!r}")
