"""Gaussian statistics of features by streaming moments: each rank sums what it extracts (n, the sum of x and
the sum of x x^T, in float64), the sums are all-reduced, and mean and covariance follow,
sigma = (S2 - S1 S1^T / n) / (n - 1) (unbiased, as numpy.cov). No rank ever holds the features themselves, so
reference statistics of a million images cost D^2 doubles per rank, not a million rows gathered to every rank.
In float64 the subtraction loses about |mu|^2 / var x 1e-16 of relative precision: nothing, for pooled features."""

import torch
import torch.distributed as dist

from lightning_ldm.distributed import all_reduce
from lightning_ldm.metrics.frechet import GaussianStatistics


class FeatureMoments:
    def __init__(self, dim: int, device: torch.device) -> None:
        self.device = device
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().to(self.device, torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def all_reduced(self) -> "FeatureMoments":
        """The sums over every rank (unchanged without a process group), in one collective."""
        dim = self.total.shape[0]
        flat = torch.cat([self.count[None], self.total, self.outer.reshape(-1)])
        flat = all_reduce(flat, dist.ReduceOp.SUM, self.device)
        reduced = FeatureMoments(dim, torch.device("cpu"))
        reduced.count, reduced.total, reduced.outer = flat[0], flat[1:1 + dim], flat[1 + dim:].reshape(dim, dim)
        return reduced

    def statistics(self) -> GaussianStatistics:
        n = int(self.count)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n}")
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return GaussianStatistics(mu, (sigma + sigma.T) / 2, n)
