"""Shared pieces of the FID tests: a random-weights Inception file in torch-fidelity's format, cheap feature
extractors of our own (TorchScript and state-dict bundle), small image folders and a stub stage-2 module."""

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lightning_ldm.diffusion.samplers import SamplerSettings
from lightning_ldm.diffusion.samplers.common import make_spec
from lightning_ldm.metrics.features import save_extractor_checkpoint
from lightning_ldm.training.base import StepCountingModule


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 with random (He-normal) weights, saved as the plain state
    dict its loader reads with torch.load. He-normal keeps activations O(1) through the ~90 layers, so the
    2048-d features vary with the input (PyTorch's default init shrinks them towards 0)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    torch.manual_seed(seed)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    empty.unlink()
    return path


class PooledPixels(nn.Module):
    """Features = the image average-pooled to size x size: FD is then a Frechet distance in pixel space."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.size).flatten(1)


class TinyConvNet(nn.Module):
    """A small convolutional network whose ``pool`` output (8-d) serves as features."""

    def __init__(self, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


def write_torchscript_extractor(path: Path, size: int = 4) -> Path:
    torch.jit.script(PooledPixels(size)).save(str(path))
    return path


def write_bundle_extractor(path: Path, in_channels: int = 1, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = TinyConvNet(in_channels)
    return save_extractor_checkpoint(net, path, target="fid_helpers.TinyConvNet",
                                     kwargs={"in_channels": in_channels}, feature_layer="pool")


def smooth_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, channels): random 4x4 colour fields upsampled, so images differ in content."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(n, channels, 4, 4)).astype(np.float32))
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{i:06d}.png")
    return folder


class OneChannelLatents:
    latent_channels = 1


class StubDiffusion(StepCountingModule):
    """Stands in for DiffusionModule where only ``generate`` matters: sample i (found from its x_T) is a given
    image, plus noise of a strength that may depend on the batch counter (a model that gets better or worse)."""

    def __init__(self, images: torch.Tensor, max_steps: int = 2, noise_by_step: Optional[dict] = None):
        super().__init__(max_steps)
        self.images = images  # [-1, 1] (N, C, H, W): the image of seed i is images[i]
        self.noise_by_step = noise_by_step or {}
        self.weight = nn.Parameter(torch.zeros(()))
        self.first_stage = OneChannelLatents()
        self.latent_size = 2
        self.num_classes = None
        self.sampling = SamplerSettings("ddim", 3, 0.0, 1.0)
        self.generate_calls = 0
        from lightning_ldm.tasks.sample import initial_noise

        self._seed_of = {float(noise.flatten()[0]): s for s, noise in enumerate(initial_noise(list(range(len(images))),
                                                                                              (1, 2, 2)))}

    def training_step(self, batch, batch_idx):
        return (self.weight - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    @torch.no_grad()
    def generate(self, n, *, labels=None, prompts=None, generator=None, sampler=None, steps=None, eta=None,
                 guidance_scale=None,
                 use_ema=True, x_T=None):
        self.generate_calls += 1
        seeds = [self._seed_of[float(x.flatten()[0])] for x in x_T.cpu()]
        images = self.images[seeds].to(self.device)
        strength = self.noise_by_step.get(self.batch_step + 1, 0.0)
        if strength:
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(123)).to(self.device)
            images = (images + strength * noise).clamp(-1, 1)
        return images, make_spec(sampler or "ddim", 1000, steps or 3, eta or 0.0, "leading")
