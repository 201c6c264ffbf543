"""Embedders of images: conditions that are maps joined to z_t along channels (LDM's "concat" conditioning,
paper Sec. 4.3-4.5), for super-resolution and inpainting.

Each also names the pairs it trains on (``pairs()``: what the data must add to every item, made on the fly from
the full-resolution image, ``lightning_ldm.data.pairs``). Their null condition is a zero map, used only where
``drop_rate`` > 0 drops it in training; classifier-free guidance keeps a map in both branches (as Stable
Diffusion's inpainting and upscaling models do), so it contrasts the other conditions (a prompt, a class).
"""

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ldm.conditioning.embedders import Embedder, Output, _Shared
from lightning_ldm.data.pairs import InpaintingPairs, SuperResolutionPairs
from lightning_ldm.errors import ConfigError, DataError


def _range(value) -> Optional[tuple[float, float]]:
    return None if value is None else (float(value[0]), float(value[1]))


class MapEmbedder(Embedder):
    output: Output = "concat"
    guidance_keeps_input = True

    def bind_first_stage(self, first_stage) -> None:
        """The frozen first stage whose latents the map joins: its factor (and, for inpainting, its encoder)."""
        self._first_stage = _Shared(first_stage)

    @property
    def first_stage(self):
        holder = getattr(self, "_first_stage", None)
        if holder is None:
            raise ConfigError(f"the {self.kind} embedder is not bound to a first stage (DiffusionModule binds it)")
        return holder.model

    def null_values(self, n: int) -> None:
        return None  # never read: guidance keeps the input (guidance_keeps_input)

    @staticmethod
    def _drop(out: Tensor, dropped: Optional[Tensor]) -> Tensor:
        return out if dropped is None else torch.where(dropped[:, None, None, None], torch.zeros_like(out), out)


class LowResolutionEmbedder(MapEmbedder):
    """Super-resolution by ``factor`` (LD's ``concat_mode`` of the released bsr_sr model): the low-resolution
    image itself, resized (bicubic) to the latent's size when the two differ, joined to z_t. With the SR factor
    equal to the first stage's (4 and f=4, as released) the image already has the latent's size and is used as is."""

    kind = "low_res"

    def __init__(self, *, factor: int, channels: int = 3, downsampling: str = "bicubic", blur_sigma=None,
                 noise_std=None, jpeg_quality=None, drop_rate: float = 0.0, input_key: str = "low_res") -> None:
        super().__init__(drop_rate=drop_rate)
        if factor not in (2, 4, 8):
            raise ConfigError(f"super-resolution factor must be 2, 4 or 8, got {factor}")
        self.factor, self.channels, self.input_key = factor, channels, input_key
        self.degradation = dict(downsampling=downsampling, blur_sigma=_range(blur_sigma),
                                noise_std=_range(noise_std), jpeg_quality=_range(jpeg_quality))
        self.pairs()  # checks the settings now, not in a worker

    @property
    def dim(self) -> int:
        return self.channels

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "factor": self.factor, "channels": self.channels, **self.degradation,
                "drop_rate": self.drop_rate, "input_key": self.input_key}

    def pairs(self) -> SuperResolutionPairs:
        d = self.degradation
        if d["downsampling"] not in ("area", "bicubic"):
            raise ConfigError(f"super-resolution downsampling must be area or bicubic, got {d['downsampling']!r}")
        quality = None if d["jpeg_quality"] is None else tuple(int(q) for q in d["jpeg_quality"])
        return SuperResolutionPairs(self.factor, d["downsampling"], d["blur_sigma"], d["noise_std"], quality)

    def latent_size(self, low_res_size: int) -> int:
        size = low_res_size * self.factor
        f = self.first_stage.downsampling_factor
        if size % f:
            raise DataError(f"a {low_res_size}px input super-resolved by {self.factor} gives {size}px, not divisible "
                            f"by the first stage's factor {f}")
        return size // f

    def check_batch(self, values: Any) -> None:
        if not isinstance(values, Tensor) or values.ndim != 4 or values.shape[1] != self.channels:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise DataError(f"super-resolution reads low-resolution images (N, {self.channels}, h, w) from the batch's "
                            f"{self.input_key!r}, got {shape}")

    def forward(self, values: Tensor, device: torch.device, dropped: Optional[Tensor] = None) -> Tensor:
        low = values.to(device=device, dtype=torch.float32, non_blocking=True)
        size = (self.latent_size(low.shape[-2]), self.latent_size(low.shape[-1]))
        if tuple(low.shape[-2:]) != size:
            low = F.interpolate(low, size=size, mode="bicubic", align_corners=False)
        return self._drop(low, dropped)


class MaskedImageEmbedder(MapEmbedder):
    """Inpainting (LD's released inpainting model, whose UNet takes 7 = 3 + 3 + 1 input channels): the masked
    image encoded by the frozen first stage (scaled, the posterior mean) and the mask brought to the latent's size,
    joined to z_t. As in LD's inpainting script, the masked pixels are black (-1) before encoding and the mask
    channel is -1 (kept) or 1 (generated). The mask is max-pooled: a latent that encodes any generated pixel is
    marked generated (LD takes the nearest pixel, which can miss a thin stroke)."""

    kind = "inpainting"

    def __init__(self, *, masks: str = "mixed", mask_root: Optional[str] = None, drop_rate: float = 0.0) -> None:
        super().__init__(drop_rate=drop_rate)
        self.masks, self.mask_root = masks, mask_root
        self.input_key = "mask"
        self.pairs()

    @property
    def input_keys(self) -> tuple[str, ...]:
        return ("image", "mask")

    @property
    def dim(self) -> int:
        return self.first_stage.latent_channels + 1

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "masks": self.masks, "mask_root": self.mask_root, "drop_rate": self.drop_rate}

    def pairs(self) -> InpaintingPairs:
        return InpaintingPairs(self.masks, self.mask_root)

    def check_batch(self, values: Any) -> None:
        image, mask = values["image"], values["mask"]
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
            raise DataError(f"inpainting masks must be (N, 1, H, W) of their images' size {tuple(image.shape[-2:])}, "
                            f"got {tuple(mask.shape)}")

    @torch.no_grad()
    def forward(self, values: Mapping[str, Tensor], device: torch.device, dropped: Optional[Tensor] = None) -> Tensor:
        image = values["image"].to(device=device, dtype=torch.float32, non_blocking=True)
        generated = values["mask"].to(device=device, dtype=torch.float32, non_blocking=True)
        masked = torch.where(generated > 0.5, -1.0, image)
        latents = self.first_stage.encode_mean(masked).float()
        factor = self.first_stage.downsampling_factor
        mask = F.max_pool2d(generated, factor) if factor > 1 else generated
        return self._drop(torch.cat([latents, mask * 2 - 1], dim=1), dropped)
