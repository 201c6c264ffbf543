"""FID during training (stage 2) and rFID of reconstructions (stage 1), as Lightning callbacks.

``FIDCallback``: every ``every_n_steps`` training batches (the module's own ``batch_step``), or every
``every_n_train_seconds`` of training time (the module's clock, evaluation excluded: the axis for comparing runs
of different speeds at equal compute), and at the end of fit,
``num_samples`` images from fixed seeds with the EMA weights and the configured sampler, against cached
statistics of the training images (``reference_split: train``, FID's usual convention) or of the held-out
validation images (``reference_split: val``: what a domain extractor trained on the training split needs for an
honest number). The metric's name does not say which split (the printed lines do): compare runs only with the
same reference. Logs ``val/fid@{n}`` (``val/fd-<name>@{n}`` for another extractor) and
``val/fid@{n}_best`` into the loggers and ``trainer.callback_metrics``, so a ModelCheckpoint can keep the
best-FID weights (conf/callbacks/fid.yaml does). Only comparable at the same n: FID from fewer samples is
biased high.

``ReconstructionFIDCallback``: at every validation, rFID of the reconstructions of a fixed set of validation
images against those originals (``val/rfid@{n}``), next to the PSNR/SSIM/LPIPS the module logs.

Weights are looked up when the callback is built, so a missing file stops the run before any training.
"""

import math
import re
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lightning_ldm.diffusion.samplers import SamplerName
from lightning_ldm.errors import ConfigError
from lightning_ldm.distributed import broadcast_object, gather_rows, rank_and_world, shard
from lightning_ldm.metrics.features import (FeatureExtractorSpec, build_feature_extractor, check_spec,
                                            metric_label)
from lightning_ldm.metrics.frechet import distance_to_reference
from lightning_ldm.metrics.reference import load_or_compute_reference, reference_indices, split_view, unflipped
from lightning_ldm.metrics.sampling import SamplingSettings, generated_features
from lightning_ldm.metrics.scores import distribution_metrics
from lightning_ldm.metrics.weights import INCEPTION, hub_checkpoint_dir, hub_file
from lightning_ldm.training.images import log_image_grid

ExtraMetric = Literal["kid", "is", "prc"]
ReferenceSplit = Literal["train", "val"]
_FID_LIKE = re.compile(r"^val/(fid|fd-)")


def as_spec(value: Any) -> FeatureExtractorSpec:
    """The extractor spec from Hydra (already built), a plain mapping, or nothing (the standard Inception)."""
    if value is None:
        return FeatureExtractorSpec()
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return FeatureExtractorSpec(**{k: v for k, v in value.items() if k != "_target_"})
    return value


def publish(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Into ``callback_metrics`` (what ModelCheckpoint reads) and every logger; usable from any hook."""
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(float(value), dtype=torch.float64)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


class FIDCallback(L.Callback):
    def __init__(
        self,
        *,
        every_n_steps: int = 5000,
        every_n_train_seconds: Optional[float] = None,
        num_samples: int = 10000,
        batch_size: int = 250,
        sampler: Optional[SamplerName] = None,
        steps: Optional[int] = None,
        eta: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        classes: Optional[list[int]] = None,
        use_ema: bool = True,
        seed: int = 0,
        feature_extractor: Optional[FeatureExtractorSpec] = None,
        reference_split: ReferenceSplit = "train",
        reference_num_images: Optional[int] = None,
        cache_dir: Optional[str] = None,
        extra_metrics: Sequence[ExtraMetric] = (),
        kid_subset_size: int = 1000,
        num_grid_images: int = 16,
        at_fit_end: bool = True,
    ) -> None:
        if every_n_steps < 0 or num_samples < 2 or batch_size < 1:
            raise ConfigError(f"callbacks.fid: every_n_steps={every_n_steps} must be >= 0 (0: only at the end), "
                              f"num_samples={num_samples} >= 2 and batch_size={batch_size} >= 1")
        if every_n_train_seconds is not None and not every_n_train_seconds > 0:
            raise ConfigError(f"callbacks.fid.every_n_train_seconds={every_n_train_seconds} must be positive (or null)")
        if reference_split not in ("train", "val"):
            raise ConfigError(f"callbacks.fid.reference_split={reference_split!r}: use train or val")
        unknown = set(extra_metrics) - {"kid", "is", "prc"}
        if unknown:
            raise ConfigError(f"callbacks.fid.extra_metrics: unknown {sorted(unknown)}; use kid, is, prc")
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.every_n_train_seconds = every_n_train_seconds
        self.last_period = 0  # training-time periods (of every_n_train_seconds) already measured
        self.settings = SamplingSettings(sampler, steps, eta, guidance_scale, use_ema, list(classes) if classes else None)
        self.seed = seed
        self.spec = as_spec(feature_extractor)
        check_spec(self.spec, "callbacks.fid.feature_extractor")  # a missing weights file stops the run here
        self.label = metric_label(self.spec)
        self.metric_key = f"val/{self.label}@{num_samples}"
        self.best_key = f"{self.metric_key}_best"
        self.reference_split = reference_split
        self.reference_num_images, self.cache_dir = reference_num_images, cache_dir
        self.extra_metrics, self.kid_subset_size = tuple(extra_metrics), kid_subset_size
        self.num_grid_images, self.at_fit_end = num_grid_images, at_fit_end
        self.best, self.best_step, self.last_step = math.inf, -1, -1
        self.history: list[tuple[int, float]] = []  # (batch, value) of this process's evaluations
        self.extractor = None
        self.reference = None
        self._dataset = self._identity = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric_key)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "last_step": self.last_step,
                "last_period": self.last_period, "reference_split": self.reference_split}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        measured = state_dict.get("reference_split", "train")  # checkpoints from before the option: train
        if measured != self.reference_split:
            raise ConfigError(f"callbacks.fid.reference_split={self.reference_split}, but this run's earlier "
                              f"{self.metric_key} values were measured against the {measured} split: its best value "
                              f"would mix the two; resume with reference_split={measured} or start a new run_name")
        self.best, self.best_step = float(state_dict["best"]), int(state_dict["best_step"])
        self.last_step = int(state_dict["last_step"])
        self.last_period = int(state_dict.get("last_period", 0))

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_dataset", None) is None:
            raise ConfigError("callbacks.fid needs a data module: FID compares samples with its images")
        self._dataset = split_view(datamodule, self.reference_split, "callbacks.fid.reference_split",
                                   whole_streams=True)
        self._identity = datamodule.identity()
        self._check_checkpoints(trainer, pl_module)
        self.extractor = build_feature_extractor(self.spec, "callbacks.fid.feature_extractor",
                                                 trainer.strategy.root_device)

    def _check_checkpoints(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A checkpoint that watches an FID key must watch one that is logged, at the batches it is measured."""
        logged = {key for cb in trainer.callbacks if isinstance(cb, FIDCallback) for key in (cb.metric_key, cb.best_key)}
        for checkpoint in trainer.checkpoint_callbacks:
            monitor = getattr(checkpoint, "monitor", None) or ""
            if not _FID_LIKE.match(monitor):
                continue
            if monitor not in logged:
                raise ConfigError(f"a ModelCheckpoint monitors {monitor}, which no FID callback logs; FID is logged "
                                  f"as {self.metric_key} (extractor and sample count): set its monitor to that")
            if monitor != self.metric_key:
                continue
            if self.every_n_train_seconds is not None:
                raise ConfigError(f"the ModelCheckpoint of {monitor} saves at batch counts, but FID is measured every "
                                  f"{self.every_n_train_seconds:g} s of training time: set callbacks.best_fid=null")
            every = getattr(checkpoint, "_every_n_train_steps", 0)
            if every != self.every_n_steps:
                raise ConfigError(f"the ModelCheckpoint of {monitor} has every_n_train_steps={every}, but FID is "
                                  f"measured every {self.every_n_steps} batches: make them equal")
            if trainer.accumulate_grad_batches != 1 or not pl_module.automatic_optimization:
                raise ConfigError(f"the ModelCheckpoint of {monitor} counts optimizer steps, which differ from "
                                  "batches with gradient accumulation or manual optimisation")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.extractor.to(pl_module.device)
        cache_dir = Path(self.cache_dir or Path(trainer.default_root_dir) / "fid_reference")
        self.reference = load_or_compute_reference(
            self._dataset, identity=self._identity, extractor=self.extractor, cache_dir=cache_dir,
            split=self.reference_split, count=self.reference_num_images, batch_size=self.batch_size,
            keep_features=bool({"kid", "prc"} & set(self.extra_metrics)))
        if trainer.is_global_zero:
            when = [f"every {self.every_n_steps} batches"] if self.every_n_steps else []
            when += [f"every {self.every_n_train_seconds:g} s of training time"] if self.every_n_train_seconds else []
            when += ["at the end of fit"] if self.at_fit_end else []
            print(f"FID: {self.metric_key} {' and '.join(when) or 'never (every_n_steps=0, at_fit_end=false)'}; "
                  f"seeds {self.seed}..{self.seed + self.num_samples - 1}, "
                  f"{'EMA' if self.settings.use_ema else 'raw'} weights; reference: {self._reference_words()}")

    # ----------------------------------------------------------------------------------------- triggers
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # Callbacks run before the module's own hook, which counts this batch: it is batch number batch_step + 1.
        completed = pl_module.batch_step + 1
        due = bool(self.every_n_steps and completed % self.every_n_steps == 0)
        if self.every_n_train_seconds and completed % pl_module.TIME_CHECK_EVERY == 0:
            # Read every few batches (reading the clock waits for the GPU), agreed across ranks (a collective).
            period = int(pl_module.agreed_training_seconds() // self.every_n_train_seconds)
            if period > self.last_period:
                self.last_period, due = period, True
        last = self.at_fit_end and completed >= pl_module.max_steps
        if due or last:
            self.evaluate(trainer, pl_module, completed)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and pl_module.batch_step > 0 and self.last_step != pl_module.batch_step:
            self.evaluate(trainer, pl_module, pl_module.batch_step)  # stopped before max_steps (epochs, signal)

    # ----------------------------------------------------------------------------------------- measuring
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            generated = generated_features(
                pl_module, self.extractor, num_samples=self.num_samples, seed_start=self.seed,
                settings=self.settings, batch_size=self.batch_size,
                keep_images=self.num_grid_images if trainer.is_global_zero else 0,
                autocast=trainer.precision_plugin.forward_context, progress=tqdm)
        finally:
            pl_module.train(was_training)
        values = None
        if trainer.is_global_zero:
            values = distribution_metrics(generated.features, self.reference, label=self.label,
                                          logits=generated.logits, extra=self.extra_metrics,
                                          kid_subset_size=self.kid_subset_size)
        values = broadcast_object(values)
        value = values[self.metric_key[len("val/"):]]
        if value < self.best:
            self.best, self.best_step = value, step
        self.last_step = step
        self.history.append((step, value))
        metrics = {f"val/{k}": v for k, v in values.items()}
        metrics[self.best_key] = self.best
        pl_module.exclude_from_training_time(time.perf_counter() - start)
        metrics["perf/train_seconds"] = pl_module.training_seconds()  # FID against training time, not batches
        publish(trainer, metrics, step)
        if trainer.is_global_zero:
            spec = generated.spec
            if len(generated.first_images):
                nrow = min(8, math.ceil(math.sqrt(len(generated.first_images))))
                log_image_grid(trainer, "val/fid_samples", generated.first_images, nrow=nrow, step=step,
                               caption=f"seeds {self.seed}.., {spec.get('name')} {spec.get('steps')} steps")
            print(f"{self.metric_key} = {value:.4g} against the {self.reference_split} split at batch {step} "
                  f"(best {self.best:.4g} at batch {self.best_step}; {spec.get('name')} {spec.get('steps')} steps, "
                  f"eta {spec.get('eta')}, guidance {spec.get('guidance_scale')}; "
                  f"{time.perf_counter() - start:.0f} s)")
        return metrics

    def _reference_words(self) -> str:
        n = self.reference.statistics.n if self.reference is not None else "?"
        return f"{n} {self.reference_split}-split images" + (" (held out)" if self.reference_split == "val" else "")


class ReconstructionFIDCallback(L.Callback):
    """rFID at every validation: reconstructions of a fixed set of validation images vs those images."""

    def __init__(self, *, num_images: int = 1000, batch_size: int = 100,
                 feature_extractor: Optional[FeatureExtractorSpec] = None, cache_dir: Optional[str] = None) -> None:
        if num_images < 2 or batch_size < 1:
            raise ConfigError(f"callbacks.rfid: num_images={num_images} must be >= 2, batch_size={batch_size} >= 1")
        self.num_images, self.batch_size, self.cache_dir = num_images, batch_size, cache_dir
        self.spec = as_spec(feature_extractor)
        check_spec(self.spec, "callbacks.rfid.feature_extractor")
        self.label = "r" + metric_label(self.spec)
        self.metric_key: Optional[str] = None  # val/rfid@{n}: n is known once the validation split is
        self.extractor = self.reference = None
        self._dataset = self._identity = None
        self._indices: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not getattr(datamodule, "val_dataset", None):
            raise ConfigError("callbacks.rfid needs validation images (data.val_fraction > 0)")
        if getattr(datamodule, "streams", False):
            raise ConfigError("callbacks.rfid: reconstruction FID on streamed shards (data=shards) is not supported "
                              "yet; set callbacks.rfid=null")
        self._dataset, self._identity = unflipped(datamodule.val_dataset), datamodule.identity()
        self._indices = reference_indices(len(self._dataset), self.num_images)
        if len(self._indices) < 2:
            raise ConfigError(f"callbacks.rfid: only {len(self._indices)} validation image(s); raise data.val_fraction")
        self.metric_key = f"val/{self.label}@{len(self._indices)}"
        self.extractor = build_feature_extractor(self.spec, "callbacks.rfid.feature_extractor",
                                                 trainer.strategy.root_device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.extractor.to(pl_module.device)
        cache_dir = Path(self.cache_dir or Path(trainer.default_root_dir) / "fid_reference")
        self.reference = load_or_compute_reference(
            self._dataset, identity=self._identity, extractor=self.extractor, cache_dir=cache_dir, split="val",
            count=self.num_images, batch_size=self.batch_size)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        rank, world = rank_and_world()
        mine = [self._indices[i] for i in shard(len(self._indices), rank, world)]
        loader = DataLoader(Subset(self._dataset, mine), batch_size=self.batch_size, shuffle=False)
        chunks = []
        for batch in loader:
            images = batch["image"].to(pl_module.device)
            with trainer.precision_plugin.forward_context():
                reconstruction = pl_module.autoencoder(images, sample_posterior=False).reconstruction
            chunks.append(self.extractor(reconstruction.float().clamp(-1, 1))["features"])
        local = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float32, device=pl_module.device)
        features = gather_rows(local)
        value = None
        if trainer.is_global_zero:
            value = distance_to_reference(self.reference.statistics, features)
        publish(trainer, {self.metric_key: broadcast_object(value)}, pl_module.batch_step)


class FIDDisabledNotice(L.Callback):
    """One line at the start of a stage-2 run without FID, saying how to turn it on."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"FID is off; add callbacks=fid to measure it during training (needs {hub_file(INCEPTION).filename} "
                  f"in {hub_checkpoint_dir()} or callbacks.fid.feature_extractor.weights_path)")
