"""Discrete noise schedules: beta_1..beta_T and alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020).

Index convention: timestep t in [0, T-1] is the paper's t+1, so alphas_cumprod[0] = 1 - betas[0] is the
least noisy level and alphas_cumprod[T-1] the most noisy. The forward process is
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)  (Ho et al. Eq. 4).
"""

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_ldm.errors import ConfigError

ScheduleKind = Literal["scaled_linear", "linear", "cosine"]


def make_betas(
    kind: ScheduleKind, num_timesteps: int, beta_start: float, beta_end: float, cosine_s: float
) -> Tensor:
    """The T betas of a schedule, in float64 (float32 would put visible error in alpha_bar near t = T)."""
    if kind == "scaled_linear":
        # LD's "linear": linear in sqrt(beta).
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "cosine":
        # Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2);
        # beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at 0.999 to avoid the singularity at t = T.
        u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ConfigError(f"schedule kind={kind!r} is unknown; use one of scaled_linear, linear, cosine")


class NoiseSchedule(nn.Module):
    """A discrete variance-preserving schedule with T steps, held as float64 buffers (callers cast).

    Buffers: ``betas`` and ``alphas_cumprod`` (alpha_bar), both shape (T,). They are not saved in the
    state dict: the constructor arguments define them, so a checkpoint cannot silently override the config.
    """

    def __init__(
        self,
        *,
        kind: ScheduleKind = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        cosine_s: float = 0.008,
    ) -> None:
        super().__init__()
        if num_timesteps < 2:
            raise ConfigError(f"schedule num_timesteps={num_timesteps} must be at least 2 (LDM uses 1000)")
        if kind in ("scaled_linear", "linear") and not 0 < beta_start <= beta_end < 1:
            raise ConfigError(
                f"schedule beta_start={beta_start}, beta_end={beta_end} must satisfy 0 < beta_start <= beta_end < 1"
            )
        if kind == "cosine" and cosine_s < 0:
            raise ConfigError(f"schedule cosine_s={cosine_s} must be >= 0 (Nichol & Dhariwal use 0.008)")
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.cosine_s = cosine_s
        self._build(torch.device("cpu"))

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, enough to rebuild this schedule (e.g. from a checkpoint)."""
        return {"kind": self.kind, "num_timesteps": self.num_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "cosine_s": self.cosine_s}

    def _build(self, device: torch.device) -> None:
        betas = make_betas(self.kind, self.num_timesteps, self.beta_start, self.beta_end, self.cosine_s)
        self.register_buffer("betas", betas.to(device), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0).to(device), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # module.to(bfloat16) / .half() (e.g. Lightning's "bf16-true" precision) would round alpha_bar to
        # 3 significant digits; follow device moves but rebuild the float64 values after any dtype cast.
        super()._apply(fn, recurse)
        if self.betas.dtype != torch.float64:
            self._build(self.betas.device)
        return self

    def _gather(self, values: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
        if t.dtype.is_floating_point:
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}")
        return values[t.to(values.device)].to(device=t.device, dtype=dtype)

    def alpha_bar(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """alpha_bar at integer timesteps ``t`` (any shape), on t's device, in ``dtype``."""
        return self._gather(self.alphas_cumprod, t, dtype)

    def snr(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps ``t`` (computed in float64)."""
        ab = self.alphas_cumprod
        return self._gather(ab / (1 - ab), t, dtype)

    def sigmas(self) -> Tensor:
        """The T noise levels sqrt((1 - alpha_bar)/alpha_bar) of the equivalent variance-exploding process
        (x_t / sqrt(alpha_bar) = x_0 + sigma eps), float64, increasing with t."""
        ab = self.alphas_cumprod
        return ((1 - ab) / ab).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (Ho et al. Eq. 4); t has shape (B,)."""
        ab = self.alpha_bar(t, dtype=torch.float64).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt().to(x0.dtype) * x0 + (1 - ab).sqrt().to(x0.dtype) * noise

    def extra_repr(self) -> str:
        if self.kind == "cosine":
            return f"kind=cosine, num_timesteps={self.num_timesteps}, cosine_s={self.cosine_s}"
        return (
            f"kind={self.kind}, num_timesteps={self.num_timesteps}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end}"
        )


__all__ = ["NoiseSchedule", "ScheduleKind", "make_betas"]
