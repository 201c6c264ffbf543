"""Schedules, parameterisations and loss weights against their closed formulas."""

import math

import pytest
import torch

from lightning_ldm.diffusion.parameterization import (
    eps_from_x0,
    loss_weight,
    target_for,
    to_x0_and_eps,
    v_from_x0_eps,
    x0_eps_from_v,
    x0_from_eps,
)
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError

# ---------------------------------------------------------------- schedules


def _alpha_bar_reference(betas: list[float]) -> list[float]:
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


def test_scaled_linear_matches_formula_and_ldm_terminal_value():
    T, b0, b1 = 1000, 0.0015, 0.0195
    sched = NoiseSchedule()
    # beta_i = (sqrt(b0) + i/(T-1) (sqrt(b1) - sqrt(b0)))^2, written out independently of torch.linspace.
    betas = [(math.sqrt(b0) + i / (T - 1) * (math.sqrt(b1) - math.sqrt(b0))) ** 2 for i in range(T)]
    ref = torch.tensor(_alpha_bar_reference(betas), dtype=torch.float64)
    assert sched.betas.dtype == sched.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(sched.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.alphas_cumprod, ref, rtol=1e-10, atol=0)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(1.4e-4, rel=0.02)  # ldm.md: terminal SNR not zero
    assert sched.betas[0].item() == pytest.approx(b0) and sched.betas[-1].item() == pytest.approx(b1)


def test_linear_matches_formula():
    T, b0, b1 = 1000, 1e-4, 0.02
    sched = NoiseSchedule(kind="linear", beta_start=b0, beta_end=b1)
    betas = [b0 + i / (T - 1) * (b1 - b0) for i in range(T)]
    ref = torch.tensor(_alpha_bar_reference(betas), dtype=torch.float64)
    torch.testing.assert_close(sched.alphas_cumprod, ref, rtol=1e-10, atol=0)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # the DDPM paper's schedule


def test_cosine_matches_cos_squared_formula_until_the_clip():
    T, s = 1000, 0.008
    sched = NoiseSchedule(kind="cosine", num_timesteps=T, cosine_s=s)

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    ref = torch.tensor([f((i + 1) / T) / f(0.0) for i in range(T)], dtype=torch.float64)
    ab = sched.alphas_cumprod
    torch.testing.assert_close(ab[:-1], ref[:-1], rtol=1e-9, atol=1e-15)
    # Only the last beta (1 - f(1)/f(1 - 1/T) = 1 since cos(pi/2) = 0) hits the 0.999 clip.
    assert (sched.betas[:-1] < 0.999).all()
    assert sched.betas[-1].item() == pytest.approx(0.999)
    assert ab[-1].item() == pytest.approx(ab[-2].item() * 1e-3, rel=1e-9)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_schedule_is_monotone_and_buffers_are_float64(kind):
    sched = NoiseSchedule(kind=kind)
    ab = sched.alphas_cumprod
    assert ab.shape == (1000,) and ab.dtype == torch.float64
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < ab[0] < 1
    torch.testing.assert_close(ab, torch.cumprod(1 - sched.betas, 0), rtol=0, atol=0)


def test_dtype_casts_keep_float64_and_buffers_stay_out_of_the_state_dict():
    sched = NoiseSchedule()
    reference = sched.alphas_cumprod.clone()
    sched = sched.to(torch.bfloat16).half().float()  # e.g. Lightning's "bf16-true" precision
    assert sched.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(sched.alphas_cumprod, reference, rtol=0, atol=0)
    assert sched.state_dict() == {}  # rebuilt from the config, never overridden by a checkpoint
    rebuilt = NoiseSchedule(**NoiseSchedule(kind="cosine", num_timesteps=50).config)
    assert rebuilt.kind == "cosine" and rebuilt.alphas_cumprod.shape == (50,)


def test_gathers_snr_and_sigmas():
    sched = NoiseSchedule()
    t = torch.tensor([0, 10, 999])
    ab64 = sched.alphas_cumprod[t]
    assert sched.alpha_bar(t).dtype == torch.float32
    torch.testing.assert_close(sched.alpha_bar(t, dtype=torch.float64), ab64, rtol=0, atol=0)
    torch.testing.assert_close(sched.snr(t, dtype=torch.float64), ab64 / (1 - ab64), rtol=1e-14, atol=0)
    sigmas = sched.sigmas()
    assert sigmas.dtype == torch.float64 and (sigmas[1:] > sigmas[:-1]).all()
    # sigma^2 = 1/SNR: the variance-exploding view of the same process.
    torch.testing.assert_close(sigmas[t] ** 2, 1 / sched.snr(t, dtype=torch.float64), rtol=1e-12, atol=0)
    assert sched.alpha_bar(t.view(3, 1)).shape == (3, 1)
    with pytest.raises(TypeError):
        sched.alpha_bar(t.float())


def test_q_sample_moments():
    """Fixed x0, many noise draws: mean sqrt(ab) x0 and variance 1 - ab (Ho et al. Eq. 4), at 5 standard errors."""
    torch.manual_seed(0)
    sched = NoiseSchedule()
    n = 100_000
    x0 = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64).repeat(n, 1)  # (n, 4)
    for step in (0, 400, 999):
        xt = sched.q_sample(x0, torch.full((n,), step), torch.randn_like(x0))
        ab = sched.alphas_cumprod[step].item()
        se_mean, se_var = math.sqrt((1 - ab) / n), (1 - ab) * math.sqrt(2 / n)
        assert (xt.mean(0) - math.sqrt(ab) * x0[0]).abs().max() < 5 * se_mean
        assert (xt.var(0) - (1 - ab)).abs().max() < 5 * se_var
    # Per-sample timesteps broadcast over the trailing dims; exact for zero noise.
    t = torch.tensor([0, 999])
    x = torch.ones(2, 3, 2, 2, dtype=torch.float64)
    out = sched.q_sample(x, t, torch.zeros_like(x))
    torch.testing.assert_close(out[:, 0, 0, 0], sched.alphas_cumprod[t].sqrt())


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_timesteps=1), dict(beta_start=0.0), dict(beta_start=0.02, beta_end=0.01), dict(beta_end=1.0),
     dict(kind="cosine", cosine_s=-0.1), dict(kind="quadratic")],
)
def test_bad_schedule_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        NoiseSchedule(**kwargs)


# ---------------------------------------------------------------- parameterisations


def _random_case(shape=(5, 3, 4, 4)):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    ab = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.98 + 0.01
    abv = ab.view(-1, 1, 1, 1)
    return x0, eps, ab, abv.sqrt() * x0 + (1 - abv).sqrt() * eps


def test_conversions_round_trip_exactly():
    x0, eps, ab, xt = _random_case()
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0_from_eps(xt, eps, ab), x0, **tol)
    torch.testing.assert_close(eps_from_x0(xt, x0, ab), eps, **tol)
    v = v_from_x0_eps(x0, eps, ab)
    abv = ab.view(-1, 1, 1, 1)
    torch.testing.assert_close(v, abv.sqrt() * eps - (1 - abv).sqrt() * x0, rtol=0, atol=0)  # Salimans & Ho
    x0_back, eps_back = x0_eps_from_v(xt, v, ab)
    torch.testing.assert_close(x0_back, x0, **tol)
    torch.testing.assert_close(eps_back, eps, **tol)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_target_for_is_consistent_with_to_x0_and_eps(prediction):
    x0, eps, ab, xt = _random_case()
    target = target_for(prediction, x0, eps, ab)
    x0_hat, eps_hat = to_x0_and_eps(prediction, target, xt, ab)  # a perfect network
    torch.testing.assert_close(x0_hat, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-12, atol=1e-12)
    # A bf16 network output is promoted to the state's dtype, not the other way round.
    x0_hat, _ = to_x0_and_eps(prediction, target.to(torch.bfloat16), xt.float(), ab)
    assert x0_hat.dtype == torch.float32


def test_unknown_prediction_raises():
    x0, eps, ab, _ = _random_case()
    with pytest.raises(ConfigError):
        target_for("score", x0, eps, ab)  # type: ignore[arg-type]


# ---------------------------------------------------------------- loss weights


def test_min_snr_weights_match_formula_and_uniform_is_ones():
    snr = torch.tensor([1e-4, 0.5, 5.0, 20.0, 1e4], dtype=torch.float64)
    gamma = 5.0
    m = torch.minimum(snr, torch.full_like(snr, gamma))
    torch.testing.assert_close(loss_weight("eps", snr, gamma), m / snr)
    torch.testing.assert_close(loss_weight("v", snr, gamma), m / (snr + 1))
    torch.testing.assert_close(loss_weight("x0", snr, gamma), m)
    for p in ("eps", "v", "x0"):
        torch.testing.assert_close(loss_weight(p, snr, None), torch.ones_like(snr))
    assert loss_weight("eps", torch.zeros(1), gamma).item() == 1.0  # the limit, not 0/0
    with pytest.raises(ConfigError):
        loss_weight("eps", snr, 0.0)


def test_min_snr_effective_x0_weight_is_the_same_for_all_targets():
    """weight_p * ||p - p_hat||^2 == min(SNR, gamma) * ||x0 - x0_hat||^2 for p in eps, v, x0."""
    x0, eps, ab, xt = _random_case()
    g = torch.Generator().manual_seed(2)
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # an imperfect network
    eps_hat = eps_from_x0(xt, x0_hat, ab)
    snr, gamma = ab / (1 - ab), 5.0
    x0_mse = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) * x0_mse
    preds = {"eps": (eps, eps_hat), "x0": (x0, x0_hat),
             "v": (v_from_x0_eps(x0, eps, ab), v_from_x0_eps(x0_hat, eps_hat, ab))}
    for prediction, (target, output) in preds.items():
        weighted = loss_weight(prediction, snr, gamma) * ((target - output) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(weighted, expected, rtol=1e-10, atol=1e-14)
