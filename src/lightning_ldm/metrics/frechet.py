"""The Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6), in float64:

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr (S_1 S_2)^{1/2}

No non-symmetric matrix square root (the usual scipy.linalg.sqrtm, which can return complex noise): with
R = S_1^{1/2}, the symmetric PSD square root from an eigendecomposition, S_1 S_2 is similar to R S_2 R, which is
symmetric PSD, so tr (S_1 S_2)^{1/2} = sum_i sqrt(lambda_i(R S_2 R)). When a set has n <= D samples its
covariance is F^T F with F = (X - mu) / sqrt(n - 1) (n x D), and those eigenvalues are the squared singular
values of F R (or of F_1 F_2^T when both sets are small): an n-sized problem instead of a D x D one. These are
exact identities, not approximations; torch-fidelity's eigenvalues of S_1 S_2 agree to rounding.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class GaussianStatistics:
    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64, unbiased (n - 1), as numpy.cov
    n: int
    factor: Optional[torch.Tensor] = None  # (n, D) with sigma = factor^T factor; kept while n <= D
    sqrt_sigma: Optional[torch.Tensor] = None  # filled on first use by ``root()``

    @classmethod
    def from_features(cls, features: torch.Tensor) -> "GaussianStatistics":
        x = features.detach().double()
        n, dim = x.shape
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n}")
        mu = x.mean(0)
        factor = (x - mu) / math.sqrt(n - 1)
        return cls(mu, factor.T @ factor, n, factor if n <= dim else None)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def root(self) -> torch.Tensor:
        """S^{1/2}: from the SVD of the factor when there is one (F = U s V^T gives V s V^T), else eigh."""
        if self.sqrt_sigma is None:
            if self.factor is not None:
                _, s, vh = torch.linalg.svd(self.factor, full_matrices=False)
                self.sqrt_sigma = (vh.T * s) @ vh
            else:
                w, v = torch.linalg.eigh(self.sigma)
                self.sqrt_sigma = (v * w.clamp_min(0).sqrt()) @ v.T
        return self.sqrt_sigma

    def to(self, device: torch.device) -> "GaussianStatistics":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GaussianStatistics(move(self.mu), move(self.sigma), self.n, move(self.factor), move(self.sqrt_sigma))


def trace_sqrt_product(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """tr (S_a S_b)^{1/2} (see the module docstring for why each branch is exact)."""
    if a.factor is not None and b.factor is not None:
        return float(torch.linalg.svdvals(a.factor @ b.factor.T).sum())
    if b.factor is not None:
        return float(torch.linalg.svdvals(b.factor @ a.root()).sum())
    if a.factor is not None:
        return float(torch.linalg.svdvals(a.factor @ b.root()).sum())
    r = a.root()
    m = r @ b.sigma @ r
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance(a: GaussianStatistics, b: GaussianStatistics) -> float:
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    b = b.to(a.mu.device)
    diff = a.mu - b.mu
    return float(diff @ diff) + float(a.sigma.trace() + b.sigma.trace()) - 2.0 * trace_sqrt_product(a, b)


def distance_to_reference(reference: GaussianStatistics, features: torch.Tensor) -> float:
    """FD of ``features`` to cached reference statistics, on the features' device; the reference goes first so
    its stored square root is used (no D x D decomposition of its own per evaluation)."""
    return frechet_distance(reference.to(features.device), GaussianStatistics.from_features(features))
