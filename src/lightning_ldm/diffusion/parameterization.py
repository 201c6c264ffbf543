"""What the network predicts (eps, x0 or v) and how its loss is weighted over timesteps.

With a = alpha_bar_t and x_t = sqrt(a) x0 + sqrt(1 - a) eps, the three targets are affine in each other for a
fixed x_t: eps (Ho et al. 2020), x0, and v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, Sec. 4).

``alpha_bar`` arguments have shape (B,) (one level per sample) or any shape broadcastable against the data;
a 1-D alpha_bar is reshaped to (B, 1, ..., 1). Results take the (promoted) dtype of the data tensors.
"""

from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_ldm.errors import ConfigError

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")


def _coefficients(alpha_bar: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(a), sqrt(1 - a)) shaped to broadcast against ``like``, in like's dtype."""
    a = alpha_bar
    if a.dim() == 1 and like.dim() > 1:
        a = a.view(-1, *([1] * (like.dim() - 1)))
    a = a.to(device=like.device, dtype=torch.float64)
    return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"prediction={prediction!r} is unknown; use one of eps, x0, v")


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    sa, s1a = _coefficients(alpha_bar, x_t)
    return (x_t - s1a * eps) / sa


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    sa, s1a = _coefficients(alpha_bar, x_t)
    return (x_t - sa * x0) / s1a


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    sa, s1a = _coefficients(alpha_bar, x0)
    return sa * eps - s1a * x0


def x0_eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    # Inverting [x_t; v] = [[sa, s1a], [-s1a, sa]] [x0; eps], a rotation since sa^2 + s1a^2 = 1.
    sa, s1a = _coefficients(alpha_bar, x_t)
    return sa * x_t - s1a * v, s1a * x_t + sa * v


def target_for(prediction: Prediction, x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """The regression target for a network predicting ``prediction``, given the clean x0 and the noise."""
    _check(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return v_from_x0_eps(x0, noise, alpha_bar)


def to_x0_and_eps(
    prediction: Prediction, model_output: Tensor, x_t: Tensor, alpha_bar: Tensor
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) implied by the network output at x_t; the output is cast to the promoted dtype."""
    _check(prediction)
    dtype = torch.promote_types(model_output.dtype, x_t.dtype)
    out, x_t = model_output.to(dtype), x_t.to(dtype)
    if prediction == "eps":
        return x0_from_eps(x_t, out, alpha_bar), out
    if prediction == "x0":
        return out, eps_from_x0(x_t, out, alpha_bar)
    return x0_eps_from_v(x_t, out, alpha_bar)


def loss_weight(prediction: Prediction, snr: Tensor, gamma: Optional[float]) -> Tensor:
    """Per-sample loss weights; ``gamma=None`` is uniform weighting (ones).

    Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR, gamma) expressed for each target. Since
    ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, the
    weights are min(SNR, gamma)/SNR (eps), min(SNR, gamma)/(SNR + 1) (v) and min(SNR, gamma) (x0).
    """
    _check(prediction)
    if gamma is None:
        return torch.ones_like(snr)
    if gamma <= 0:
        raise ConfigError(f"min_snr_gamma={gamma} must be > 0 (Hang et al. use 5), or null for uniform weights")
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma)/SNR, and 1 (not 0/0) where SNR = 0
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


__all__ = [
    "PREDICTIONS",
    "Prediction",
    "eps_from_x0",
    "loss_weight",
    "target_for",
    "to_x0_and_eps",
    "v_from_x0_eps",
    "x0_eps_from_v",
    "x0_from_eps",
]
