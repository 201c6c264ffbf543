"""Sample-quality metrics: FID (and KID, IS, precision/recall) against cached statistics of the training data,
during training (``callback``) and after it (``lightning_ldm.tasks.evaluate``)."""

from lightning_ldm.metrics.callback import FIDCallback, FIDDisabledNotice, ReconstructionFIDCallback
from lightning_ldm.metrics.features import (FeatureExtractor, FeatureExtractorSpec, build_feature_extractor,
                                            metric_label, save_extractor_checkpoint)
from lightning_ldm.metrics.frechet import GaussianStatistics, frechet_distance
from lightning_ldm.metrics.reference import Reference, load_or_compute_reference

__all__ = [
    "FIDCallback", "FIDDisabledNotice", "ReconstructionFIDCallback", "FeatureExtractor", "FeatureExtractorSpec",
    "build_feature_extractor", "metric_label", "save_extractor_checkpoint", "GaussianStatistics",
    "frechet_distance", "Reference", "load_or_compute_reference",
]
