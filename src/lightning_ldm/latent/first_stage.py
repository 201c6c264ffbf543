"""The frozen first stage of a latent diffusion model: encode images to scaled latents and decode them back.

Frozen for good: no gradients, not in any optimiser or EMA, and in eval mode that ``.train()`` cannot undo
(Lightning switches the whole LightningModule to train mode at every epoch start). Its weights are part of
the stage-2 state dict, so a stage-2 checkpoint alone can sample.

The latent scale (paper Sec. 4.3.2 / LD's ``scale_by_std``): z <- scale_factor * z before diffusion and
z / scale_factor before decoding, so that the diffusion model sees latents of about unit variance. It is a
buffer, hence stored in checkpoints and never recomputed on resume (NaN until estimated or configured).
"""

import json
from pathlib import Path
from typing import Iterable, Literal, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_ldm.autoencoder.export import load_autoencoder_export, read_export_metadata
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.interop.autoencoder import load_pretrained_autoencoder, pretrained_autoencoder_kind
from lightning_ldm.latent.scale import estimate_scale_factor, ranks_agree
from lightning_ldm.strict_loading import load_state_strictly


class FrozenFirstStage(nn.Module):
    def __init__(self, autoencoder: Optional[nn.Module], export_config: dict, *, latent_channels: int,
                 downsampling_factor: int, image_channels: int, regularizer: str,
                 scale_factor: Optional[float] = None, sample_posterior: bool = True,
                 source: str = "") -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.export_config = export_config  # what rebuilds the architecture from a stage-2 checkpoint
        self.latent_channels = latent_channels
        self.downsampling_factor = downsampling_factor
        self.image_channels = image_channels
        self.regularizer = regularizer
        # LD samples the KL posterior at every step (a small data augmentation); its mean is the alternative.
        self.sample_posterior = sample_posterior
        self.source = source
        initial = float("nan") if scale_factor is None else float(scale_factor)
        self.register_buffer("scale_factor", torch.tensor(initial, dtype=torch.float32))
        # (buffer, its version) last found finite; holding the buffer itself means a replacement can never pass
        # for it (an id() could be reused by a new tensor).
        self._checked_scale: Optional[tuple[torch.Tensor, int]] = None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenFirstStage":
        return self  # stays in eval mode whatever the parent does

    @property
    def scale_is_set(self) -> bool:
        return bool(torch.isfinite(self.scale_factor))

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and std (std = 0 for VQ and identity)."""
        if self.autoencoder is None:
            return images, torch.zeros_like(images)
        posterior = self.autoencoder.encode(images)
        return posterior.mean, posterior.std

    def scaled_latents(self, mean: torch.Tensor, std: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = scale * (mean + std * eps) when sampling the posterior, else scale * mean."""
        # Reading the scale on the host waits for the GPU (a sync every training batch: the CPU could no longer
        # queue the next step ahead of it), so it is read only when the buffer changed: filled, loaded or moved.
        checked = self._checked_scale
        if checked is None or checked[0] is not self.scale_factor or checked[1] != self.scale_factor._version:
            if not self.scale_is_set:
                raise RuntimeError("scale_factor used before it was estimated or configured")
            self._checked_scale = (self.scale_factor, self.scale_factor._version)
        z = self._posterior_draw(mean, std, generator)
        return z * self.scale_factor.to(z.dtype)

    def _posterior_draw(self, mean: torch.Tensor, std: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps when sampling the KL posterior (LD's per-step augmentation), else the mean."""
        if not (self.sample_posterior and self.regularizer == "kl"):
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    @torch.no_grad()
    def unscaled_sample(self, batch: dict, device: torch.device) -> torch.Tensor:
        """Unscaled latents of a batch of images or of cached latents (``latent_mean``, ``latent_std``), drawn from
        the posterior as training draws them."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            mean, std = self.encode_distribution(batch["image"].to(device))
        return self._posterior_draw(mean, std)

    def fit_scale(self, batches: Iterable[dict], num_batches: int, device: torch.device) -> float:
        """The scale of Sec. 4.3.2, 1 / std of the latents of ``num_batches`` batches per rank (a scale already
        set, configured or restored from a checkpoint, is kept); every rank must end with the same value."""
        if not self.scale_is_set:
            self.scale_factor.fill_(estimate_scale_factor(batches, lambda batch: self.unscaled_sample(batch, device),
                                                          num_batches, device))
        scale = float(self.scale_factor)
        low, high = ranks_agree(scale, device)
        if low != high:  # a rank on another scale trains on differently scaled latents: the LD DDP bug
            raise RuntimeError(f"scale_factor differs across ranks: {low} .. {high}")
        return scale

    @torch.no_grad()
    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """The scaled posterior mean: an input image's latents for image-to-image and inpainting."""
        if not self.scale_is_set:
            raise RuntimeError("scale_factor used before it was estimated or configured")
        return self.encode_distribution(images)[0] * self.scale_factor.to(images.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.scaled_latents(*self.encode_distribution(images))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scale_factor.to(z.dtype)
        return z if self.autoencoder is None else self.autoencoder.decode(z)


def identity_first_stage(*, image_channels: int = 3, scale_factor: float = 1.0) -> FrozenFirstStage:
    """Pixel space (f = 1): the same stage-2 code trains a plain pixel-space diffusion model."""
    return FrozenFirstStage(None, {"identity": True, "image_channels": image_channels},
                            latent_channels=image_channels, downsampling_factor=1, image_channels=image_channels,
                            regularizer="identity", scale_factor=scale_factor, sample_posterior=False,
                            source="identity")


def _architecture(config: dict) -> dict:
    return {"regularizer": config.get("regularizer"), "downsampling_factor": 2 ** (len(config.get("ch_mult", [1])) - 1)}


def describe_progress(info: dict) -> str:
    """'' for a finished export; else where its run stopped."""
    if info.get("complete", True):  # exports written before the flag existed count as finished
        return ""
    return f"unfinished: written at batch {info.get('batch_step', '?')} of {info.get('max_steps', '?')}"


def newest_matching_export(search_root: Path, data_identity: dict, expected: Optional[dict] = None,
                           allow_incomplete: bool = False) -> Path:
    """The most recent ``export/autoencoder.safetensors`` under ``search_root`` trained on the same data (and,
    if ``expected`` names them, with that regulariser and downsampling factor), of a run that finished unless
    ``allow_incomplete``."""
    keys = ("name", "image_size", "channels")
    wanted = {k: data_identity.get(k) for k in keys}
    expected = {k: v for k, v in (expected or {}).items() if v is not None}
    candidates, unfinished = [], []
    for path in Path(search_root).glob("**/export/autoencoder.safetensors"):
        try:
            metadata = read_export_metadata(path)
        except CheckpointError:
            continue
        architecture = _architecture(metadata["config"])
        if {k: metadata["data"].get(k) for k in keys} == wanted and all(architecture[k] == v for k, v in expected.items()):
            progress = describe_progress(metadata["info"])
            (unfinished if progress and not allow_incomplete else candidates).append((path.stat().st_mtime, path, progress))
    if not candidates and unfinished:
        _, path, progress = max(unfinished)
        raise CheckpointError(
            f"the only stage-1 exports for data {json.dumps(wanted)} under {search_root} are of runs that did not "
            f"finish (newest: {path}, {progress}); rerun its command to finish it, or pass "
            "autoencoder.allow_incomplete=true (or autoencoder.path=...) to use it as it is")
    if not candidates:
        raise CheckpointError(
            f"no stage-1 export for data {json.dumps(wanted)}{' and ' + json.dumps(expected) if expected else ''} "
            f"under {search_root}; train one with `python -m lightning_ldm stage=autoencoder` (same data) or set "
            "autoencoder.path=/path/to/autoencoder.safetensors")
    return max(candidates)[1]


def load_first_stage(*, path: Optional[str] = None, search_root: str = "outputs", data=None,
                     scale_factor: Optional[float] = None, sample_posterior: bool = True,
                     regularizer: Optional[Literal["kl", "vq"]] = None,
                     downsampling_factor: Optional[int] = None, allow_incomplete: bool = False,
                     architecture: Optional[Union[str, dict]] = None) -> FrozenFirstStage:
    """Load a stage-1 export strictly: by ``path``, or the newest export of the same data under ``search_root``.

    ``path`` may also name pretrained weights of another codebase (``interop.autoencoder``): a diffusers
    AutoencoderKL / VQModel or pipeline folder, or an original CompVis checkpoint, whose architecture
    (Autoencoder kwargs or a preset name) ``architecture`` must give.

    ``scale_factor``: None estimates 1/std of the latents at the start of training (VQ latents stay unscaled,
    as in the paper, unless a value is given); a diffusers KL model's ``scaling_factor`` (or an original
    LatentDiffusion checkpoint's ``scale_factor``) is used instead where there is one. ``regularizer`` /
    ``downsampling_factor``, when set (the paper presets set them), are required of the export: an LDM-4 preset
    never picks up a KL-f8 export by accident.
    """
    expected = {"regularizer": regularizer, "downsampling_factor": downsampling_factor}
    pretrained = None if path is None else pretrained_autoencoder_kind(Path(path))
    if pretrained is not None:
        return pretrained_first_stage(Path(path).expanduser(), pretrained, architecture, expected, scale_factor,
                                      sample_posterior)
    if path is None:
        if data is None or not hasattr(data, "identity"):
            raise ConfigError("autoencoder.path is not set and there is no data identity to search exports by")
        export = newest_matching_export(Path(search_root), data.identity(), expected, allow_incomplete)
        what = "newest matching stage-1 export"
    else:
        export = Path(path).expanduser()
        if export.suffix == ".ckpt":
            return first_stage_from_checkpoint(export, sample_posterior)
        what = "stage-1 export"
    model, metadata = load_autoencoder_export(export)
    progress = describe_progress(metadata["info"])
    print(f"First stage: {what} {export}" + (f" (warning: {progress})" if progress else ""))
    config = metadata["config"]
    mismatched = {k: v for k, v in expected.items() if v is not None and _architecture(config)[k] != v}
    if mismatched:
        raise CheckpointError(f"{export} has {json.dumps(_architecture(config))}, the config expects {json.dumps(mismatched)}")
    if scale_factor is None and config["regularizer"] == "vq":
        scale_factor = 1.0
    return FrozenFirstStage(model, {"export": str(export), "config": config}, latent_channels=model.latent_channels,
                            downsampling_factor=model.downsampling_factor, image_channels=config["in_channels"],
                            regularizer=config["regularizer"], scale_factor=scale_factor,
                            sample_posterior=sample_posterior, source=str(export))


def pretrained_first_stage(path: Path, kind: str, architecture: Optional[Union[str, dict]], expected: dict,
                           scale_factor: Optional[float], sample_posterior: bool) -> FrozenFirstStage:
    """A first stage from a diffusers model or an original CompVis checkpoint (``kind``; see ``load_first_stage``)."""
    if isinstance(architecture, DictConfig):
        architecture = OmegaConf.to_container(architecture, resolve=True)
    model, found_scale = load_pretrained_autoencoder(path, architecture)
    config = model.config
    mismatched = {k: v for k, v in expected.items() if v is not None and _architecture(config)[k] != v}
    if mismatched:
        raise CheckpointError(f"{path} has {json.dumps(_architecture(config))}, "
                              f"the config expects {json.dumps(mismatched)}")
    if scale_factor is None:
        # VQ latents stay unscaled (the paper): the 0.18215 diffusers writes into every VQModel config is SD's KL-f8 scale
        scale_factor = 1.0 if config["regularizer"] == "vq" else found_scale
    print(f"First stage: pretrained {kind} autoencoder {path}"
          + (f" (scale_factor {scale_factor})" if scale_factor is not None else ""))
    return FrozenFirstStage(model, {"export": str(path), "config": config}, latent_channels=model.latent_channels,
                            downsampling_factor=model.downsampling_factor, image_channels=config["in_channels"],
                            regularizer=config["regularizer"], scale_factor=scale_factor,
                            sample_posterior=sample_posterior, source=str(path))


def rebuild_first_stage(export_config: dict, sample_posterior: bool) -> FrozenFirstStage:
    """The architecture (random weights) of a first stage described in a stage-2 checkpoint."""
    if export_config.get("identity"):
        return identity_first_stage(image_channels=export_config["image_channels"])
    from lightning_ldm.autoencoder.model import Autoencoder

    config = export_config["config"]
    model = Autoencoder(**config)
    return FrozenFirstStage(model, export_config, latent_channels=model.latent_channels,
                            downsampling_factor=model.downsampling_factor, image_channels=config["in_channels"],
                            regularizer=config["regularizer"], sample_posterior=sample_posterior,
                            source=export_config.get("export", ""))


def first_stage_from_checkpoint(path: Path, sample_posterior: bool) -> FrozenFirstStage:
    """The first stage stored inside a stage-2 checkpoint: what a resumed run must keep using, even if the
    export it started from has since been overwritten or deleted."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        config = checkpoint["lightning_ldm"]["config"]["first_stage"]
        state = {k[len("first_stage."):]: v for k, v in checkpoint["state_dict"].items()
                 if k.startswith("first_stage.")}
    except Exception as error:
        export = path.parent.parent / "export" / "autoencoder.safetensors"  # <run>/checkpoints/x.ckpt -> <run>/export
        hint = (f"; a stage-1 run's model for stage 2 is its export: autoencoder.path={export}" if export.is_file()
                else "; stage 2 loads a stage-1 export (<stage-1 run>/export/autoencoder.safetensors) or a stage-2 checkpoint")
        raise CheckpointError(f"{path} holds no lightning_ldm stage-2 first stage ({type(error).__name__}){hint}") from None
    first_stage = rebuild_first_stage(config, sample_posterior)
    load_state_strictly(first_stage, state, path)
    print(f"First stage: from the stage-2 checkpoint {path} (originally {first_stage.source or 'identity'})")
    return first_stage
