"""Denoising UNet of LDM stage 2 (ADM / LDM "openaimodel" architecture)."""

from .embeddings import TimestepEmbedding, timestep_embedding
from .model import PRESETS, UNet

__all__ = ["PRESETS", "TimestepEmbedding", "UNet", "timestep_embedding"]
