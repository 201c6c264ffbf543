"""Latent-space regularisers of the stage-1 autoencoder (paper Sec. 3.1): a slight KL penalty towards N(0, I)
on a diagonal-Gaussian posterior, or vector quantisation (VQ-VAE, van den Oord et al. 2017)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# Bounds on the posterior log-variance: keeps exp(logvar) finite in float32 and bf16 early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
_DISTANCE_BUDGET = 2**26  # float32 elements per chunk of the VQ distance matrix


class LatentDistribution(Protocol):
    """What `Autoencoder.encode` returns: stage 2 samples from it (or takes its mode) to get z."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def mode(self) -> torch.Tensor: ...


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))), from a tensor holding (mean, logvar) along dim 1."""

    def __init__(self, parameters: torch.Tensor) -> None:
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps, so gradients reach the encoder."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over all latent elements, one value per sample.

        Computed in float32: a sum over thousands of elements in bf16 would lose the 1e-6-weighted signal.
        """
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + var - 1.0 - logvar, dim=tuple(range(1, mean.ndim)))


class PointLatent:
    """A deterministic 'distribution' (std 0): the continuous pre-quantisation latent of a VQ autoencoder."""

    def __init__(self, value: torch.Tensor) -> None:
        self.mean = value
        self.std = torch.zeros_like(value)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # straight-through z_q, shape of the input
    loss: torch.Tensor  # codebook + commitment loss, scalar
    indices: torch.Tensor  # (B, H, W) code index per latent position
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram), detached
    codebook_usage: torch.Tensor  # fraction of codes used at least once in the batch, detached


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantisation with the straight-through estimator.

    Loss (VQ-VAE Eq. 3, "non-legacy"): beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2, mean-reduced. The first
    (commitment) term trains only the encoder, the second (codebook) term only the codes.
    """

    def __init__(self, *, num_codes: int, code_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.embedding = nn.Embedding(num_codes, code_dim)  # name matches the LD checkpoints' quantize.embedding
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    @torch.no_grad()
    def nearest_code(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) for every latent vector; z is (B, code_dim, H, W) -> (B, H, W).

        Distances in float32 even under autocast: bf16 rounding would pick the wrong code among close ones.
        """
        b, c, h, w = z.shape
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.embedding.weight.detach().float()
        code_norms = codes.pow(2).sum(dim=1)
        # Chunked so the (positions x codes) distance matrix stays under ~256 MiB: a 256^2 f4 batch of 16 against
        # 8192 codes would otherwise need 2 GiB.
        rows = max(1, _DISTANCE_BUDGET // self.num_codes)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 does not change the argmin
        with torch.autocast(device_type=z.device.type, enabled=False):
            indices = [(code_norms - 2.0 * chunk @ codes.t()).argmin(dim=1) for chunk in flat.split(rows)]
        return torch.cat(indices).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for an index map (B, H, W) -> (B, code_dim, H, W)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def straight_through(self, z: torch.Tensor) -> torch.Tensor:
        """Quantised z whose gradient passes to z unchanged; no loss or statistics (what decoding needs)."""
        return _straight_through(z, self.lookup(self.nearest_code(z)))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        indices = self.nearest_code(z)
        z_q = self.lookup(indices)
        commitment = F.mse_loss(z.float(), z_q.detach())
        codebook = F.mse_loss(z.detach().float(), z_q)
        loss = self.beta * commitment + codebook
        perplexity, usage = self.code_statistics(indices)
        return QuantizerOutput(_straight_through(z, z_q), loss, indices, perplexity, usage)

    @torch.no_grad()
    def code_statistics(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Perplexity exp(-sum p log p) of the batch's code histogram p, and the fraction of codes used.

        Both collapse when codes die, the classic VQ failure. scatter_add_ on int64 rather than bincount:
        bincount waits for the GPU to find the largest index; this does not, and stays deterministic.
        """
        flat = indices.reshape(-1)
        counts = torch.zeros(self.num_codes, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        p = counts.float() / flat.numel()
        entropy = -torch.sum(p * torch.log(p.clamp_min(1e-12)))
        return torch.exp(entropy), (counts > 0).float().mean()


def _straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Forward value z_q, gradient identity to z (VQ-VAE's straight-through estimator)."""
    z32 = z.float()
    return (z32 + (z_q.float() - z32).detach()).to(z.dtype)
