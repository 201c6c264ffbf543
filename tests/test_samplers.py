"""Samplers and classifier-free guidance, driven by exact denoisers of analytic data distributions.

For Gaussian data N(mu, s^2) the optimal denoiser is closed-form, x0_hat = E[x0 | x_t] = mu + k (x_t - sqrt(a) mu)
with k = sqrt(a) s^2 / (a s^2 + 1 - a); s = 0 is a single point (Dirac). Samplers return x0_hat at their smallest
timestep t_min, so for a perfect sampler the output is N(mu, Var(E[x0 | x_tmin])) = N(mu, a s^4 / v), v = a s^2 + 1 - a.
"""

import math

import pytest
import torch

from lightning_ldm.diffusion import NoiseSchedule, guided_model_fn, make_denoiser, sample, target_for
from lightning_ldm.diffusion.samplers import (FromImage, invert_ddim, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                                          timesteps)
from lightning_ldm.errors import ConfigError

MU, S = 1.5, 0.5
SCHED = NoiseSchedule()
AB = SCHED.alphas_cumprod.tolist()
F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    # Scalar chains of ~1e5 elements: a second intra-op thread only adds synchronisation on a shared 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian_denoiser(mu: float, s: float):
    def denoise(x, t):
        a = SCHED.alpha_bar(t, F64).view(-1, *([1] * (x.dim() - 1)))
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * mu)
        return x0, (x - a.sqrt() * x0) / (1 - a).sqrt()

    return denoise


def two_point_denoiser(x, t):
    """Data +-1 with equal probability: E[x0 | x_t] = tanh(sqrt(a) x_t / (1 - a))."""
    a = SCHED.alpha_bar(t, F64).view(-1, *([1] * (x.dim() - 1)))
    x0 = torch.tanh(a.sqrt() * x / (1 - a))
    return x0, (x - a.sqrt() * x0) / (1 - a).sqrt()


def marginal(t: int, n: int, seed: int, mu: float = MU, s: float = S) -> torch.Tensor:
    """n draws of x_t ~ q(x_t) = N(sqrt(a) mu, a s^2 + 1 - a) for Gaussian data."""
    a = AB[t]
    g = torch.Generator().manual_seed(seed)
    return math.sqrt(a) * mu + math.sqrt(a * s**2 + 1 - a) * torch.randn(n, generator=g, dtype=F64)


def gaussian_chain(name: str, ts: list[int], eta: float, s: float = S) -> tuple[float, float]:
    """The law of a sampler's output on Gaussian data, from the papers' update rules: with y = x_t - sqrt(a) mu,
    output - mu = G y_T + N(0, noise_var). Returns (G, noise_var)."""

    def k(a):
        return math.sqrt(a) * s**2 / (a * s**2 + 1 - a)  # x0_hat - mu = k y

    def e(a):
        return (1 - math.sqrt(a) * k(a)) / math.sqrt(1 - a)  # eps_hat = e y

    def lam(a):
        return 0.5 * math.log(a / (1 - a))

    gain, var, d_prev, h_prev = 1.0, 0.0, None, None
    for t, tn in zip(ts, ts[1:]):
        a, an = AB[t], AB[tn]
        if name == "ddim":  # Song et al. Eq. 12
            sigma2 = eta**2 * (1 - an) / (1 - a) * (1 - a / an)
            m = math.sqrt(an) * k(a) + math.sqrt(1 - an - sigma2) * e(a)
        elif name == "ddpm":  # Ho et al. Eq. 7, respaced beta = 1 - a/a'
            beta = 1 - a / an
            sigma2 = (1 - an) / (1 - a) * beta
            m = math.sqrt(an) * beta / (1 - a) * k(a) + math.sqrt(1 - beta) * (1 - an) / (1 - a)
        if name in ("ddim", "ddpm"):
            gain, var = m * gain, m * m * var + sigma2
            continue
        # DPM-Solver++(2M), Lu et al. 2022 Alg. 2 (deterministic: track the gain only).
        h, d = lam(an) - lam(a), k(a) * gain
        if d_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
        d_prev, h_prev = k(a) * gain, h
        gain = math.sqrt((1 - an) / (1 - a)) * gain - math.sqrt(an) * math.expm1(-h) * d
    kmin = k(AB[ts[-1]])
    return kmin * gain, kmin**2 * var


# --------------------------------------------------------------------------- timesteps and bookkeeping


def test_spacing_values_for_1000_steps_50():
    assert timesteps(1000, 50, "leading") == list(range(1, 1000, 20))  # LD: 1, 21, ..., 981
    assert timesteps(1000, 50, "trailing") == list(range(19, 1000, 20))  # SGM: ..., 979, 999
    lin = timesteps(1000, 50, "linspace")
    assert lin[0] == 0 and lin[-1] == 999 and lin[1] == 20
    assert timesteps(1000, 1000, "leading") == list(range(1000)) == timesteps(1000, 1000, "trailing")
    for T, steps in [(1000, 1), (1000, 7), (1000, 30), (1000, 999), (10, 3), (10, 10)]:
        for spacing in ("leading", "trailing", "linspace"):
            ts = timesteps(T, steps, spacing)
            assert len(ts) == steps and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] <= T - 1, (T, steps, spacing)
    for bad in (0, 1001):
        with pytest.raises(ConfigError):
            timesteps(1000, bad, "trailing")
    with pytest.raises(ConfigError):
        timesteps(1000, 50, "uniform")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_one_denoiser_call_per_step_and_spec_records_the_run(name):
    seen = []
    denoise = gaussian_denoiser(MU, S)
    x, spec = sample(name, denoise, SCHED, (4, 2, 3, 3), steps=10, spacing="leading",
                     generator=torch.Generator().manual_seed(0), dtype=F64,
                     callback=lambda i, t, x_t, x0: seen.append((i, t, x_t.shape, x0.dtype)))
    assert x.shape == (4, 2, 3, 3) and x.dtype == F64
    assert [t for _, t, _, _ in seen] == list(spec.timesteps) == timesteps(1000, 10, "leading")[::-1]
    assert [i for i, _, _, _ in seen] == list(range(10))
    d = spec.as_dict()
    assert d["name"] == name and d["steps"] == 10 and d["spacing"] == "leading"
    assert d["eta"] == {"ddpm": 1.0, "ddim": 0.0, "dpmpp_2m": 0.0}[name]
    assert (d["t_max"], d["t_min"]) == (901, 1) and d["timesteps"][0] == 901


def test_eta_is_validated_not_ignored():
    denoise, g = gaussian_denoiser(MU, S), torch.Generator()
    with pytest.raises(ConfigError):
        sample("ddpm", denoise, SCHED, (2,), steps=5, eta=0.5, generator=g)
    with pytest.raises(ConfigError):
        sample("dpmpp_2m", denoise, SCHED, (2,), steps=5, eta=1.0, generator=g)
    with pytest.raises(ConfigError):
        sample("ddim", denoise, SCHED, (2,), steps=5, eta=1.5, generator=g)
    with pytest.raises(ConfigError):
        sample("plms", denoise, SCHED, (2,), steps=5, generator=g)  # type: ignore[arg-type]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_make_denoiser_hides_the_parameterisation(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = SCHED.q_sample(x0, t, eps)

    def oracle(x, tt):  # a perfect network for this (x0, eps), in bf16 as under autocast
        return target_for(prediction, x0, eps, SCHED.alpha_bar(tt, F64)).to(torch.bfloat16)

    x0_hat, eps_hat = make_denoiser(oracle, SCHED, prediction)(x_t, t)
    assert x0_hat.dtype == eps_hat.dtype == torch.float32
    # bf16 output precision, amplified by 1/sqrt(a) ~ 84 at t = 999 for eps / sqrt(1-a) ~ 26 at t = 0 for x0.
    torch.testing.assert_close(x0_hat[1], x0[1], rtol=0, atol=0.05)
    torch.testing.assert_close(eps_hat[1], eps[1], rtol=0, atol=0.05)


# --------------------------------------------------------------------------- exactness on analytic data


@pytest.mark.parametrize("name,steps,eta", [("ddim", 50, 0.0), ("dpmpp_2m", 20, None), ("ddim", 50, 1.0),
                                            ("ddpm", 100, None)])
def test_single_point_data_keeps_every_marginal_exact(name, steps, eta):
    """With data = one point the denoiser is exact, so every visited x_t must be N(sqrt(a) mu, 1 - a)."""
    n, ts = 40_000, timesteps(1000, steps, "trailing")[::-1]
    x_T = marginal(ts[0], n, seed=1, s=0.0)
    z_T = (x_T - math.sqrt(AB[ts[0]]) * MU) / math.sqrt(1 - AB[ts[0]])
    zs = {}

    def record(i, t, x_t, x0):
        zs[t] = (x_t - math.sqrt(AB[t]) * MU) / math.sqrt(1 - AB[t])

    x, _ = sample(name, gaussian_denoiser(MU, 0.0), SCHED, (n,), steps=steps, eta=eta, dtype=F64,
                  generator=torch.Generator().manual_seed(2), x_T=x_T, callback=record)
    torch.testing.assert_close(x, torch.full_like(x, MU), rtol=0, atol=1e-9)
    if eta in (None, 0.0) and name != "ddpm":  # deterministic: each sample stays on its own trajectory
        for z in zs.values():
            torch.testing.assert_close(z, z_T, rtol=0, atol=1e-9)
    else:  # standardised x_t is N(0, 1) at every step: 5 standard errors
        for t, z in zs.items():
            assert abs(z.mean().item()) < 5 / math.sqrt(n), t
            assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n), t


# Allowed |Var(output)/Var(E[x0|x_tmin]) - 1| from discretisation alone, computed by gaussian_chain for
# mu=1.5, s=0.5, trailing spacing: ddpm 1000 -2.0%, ddim 50 eta 0 -6.6%, eta 1 -14.9%, dpmpp_2m 20 +0.8%.
CASES = [("ddpm", 1000, None, 0.03), ("ddim", 50, 0.0, 0.08), ("ddim", 50, 1.0, 0.17), ("dpmpp_2m", 20, None, 0.015)]


@pytest.mark.parametrize("name,steps,eta,discretisation", CASES)
def test_gaussian_data_moments(name, steps, eta, discretisation):
    n = 40_000 if name == "ddpm" else 100_000
    ts = timesteps(1000, steps, "trailing")[::-1]
    x_T = marginal(ts[0], n, seed=3)
    x, spec = sample(name, gaussian_denoiser(MU, S), SCHED, (n,), steps=steps, eta=eta, dtype=F64,
                     generator=torch.Generator().manual_seed(4), x_T=x_T)
    a_min = AB[spec.timesteps[-1]]
    target_var = a_min * S**4 / (a_min * S**2 + 1 - a_min)
    gain, noise_var = gaussian_chain(name, ts, eta or (1.0 if name == "ddpm" else 0.0))
    var_T = AB[ts[0]] * S**2 + 1 - AB[ts[0]]
    chain_var = gain**2 * var_T + noise_var
    se_mean, se_var = math.sqrt(chain_var / n), chain_var * math.sqrt(2 / n)
    # 1. The mean is not biased by discretisation: exact to 5 standard errors.
    assert abs(x.mean().item() - MU) < 5 * se_mean
    # 2. The implementation follows the papers' update rules.
    if noise_var == 0:  # deterministic: sample by sample
        torch.testing.assert_close(x - MU, gain * (x_T - math.sqrt(AB[ts[0]]) * MU), rtol=1e-9, atol=1e-12)
    else:
        assert abs(x.var().item() - chain_var) < 5 * se_var
    # 3. Those rules reproduce the data's variance up to the known discretisation error.
    assert abs(chain_var / target_var - 1) < discretisation
    assert abs(x.var().item() / target_var - 1) < discretisation + 5 * se_var / target_var


def test_ddpm_and_ddim_eta_1_are_the_same_chain():
    """Ho et al.'s posterior (Eq. 7) and Song et al.'s Eq. 12 at eta = 1 coincide, draw for draw."""
    kw = dict(steps=25, spacing="leading", dtype=F64)
    denoise = gaussian_denoiser(MU, S)
    a, _ = sample_ddpm(denoise, SCHED, (1000,), generator=torch.Generator().manual_seed(5), **kw)
    b, _ = sample_ddim(denoise, SCHED, (1000,), eta=1.0, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ddim_inversion_reconstructs_the_data():
    x0 = MU + S * torch.randn(2000, generator=torch.Generator().manual_seed(6), dtype=F64)
    denoise = gaussian_denoiser(MU, S)
    errors = {}
    for iters in (0, 6):
        x_T, spec = invert_ddim(denoise, x0, SCHED, steps=50, fixed_point_iters=iters)
        assert spec.timesteps == tuple(timesteps(1000, 50, "trailing")[::-1])
        back, _ = sample_ddim(denoise, SCHED, x0.shape, steps=50, x_T=x_T, dtype=F64)
        errors[iters] = (back - x0).abs().max().item()
    assert errors[6] < 1e-6  # the exact inverse of the sampler's map, up to the fixed-point tolerance
    assert 1e-2 < errors[0] < 0.5  # the usual one-pass inversion is only first-order accurate (0.12 here)


def test_two_point_data_dpmpp_2m_20_steps_agrees_with_ddim_100():
    n = 20_000
    x_T = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=F64)
    fast, _ = sample_dpmpp_2m(two_point_denoiser, SCHED, (n,), steps=20, x_T=x_T, dtype=F64)
    slow, _ = sample_ddim(two_point_denoiser, SCHED, (n,), steps=100, x_T=x_T, dtype=F64)
    # Concentrated on +-1. At 20 trailing steps the output is E[x0 | x_49], and samples that sit between the
    # modes at t = 49 (noise std 0.28) are legitimately not saturated: 97% are within 1e-3, 98.9% within 0.1.
    assert ((fast.abs() - 1).abs() < 0.1).float().mean() > 0.985
    assert ((slow.abs() - 1).abs() < 1e-3).float().mean() > 0.999
    for x in (fast, slow):
        assert abs((x > 0).float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)  # with equal mass
    assert (fast.sign() == slow.sign()).float().mean() > 0.999  # the same ODE, solved to the same endpoint


# --------------------------------------------------------------------------- randomness and devices


@pytest.mark.parametrize("name,eta", [("ddpm", None), ("ddim", 1.0), ("dpmpp_2m", None)])
def test_seeded_generator_reproduces_and_different_seeds_differ(name, eta):
    denoise = gaussian_denoiser(MU, S)

    def run(seed, progress=False):
        return sample(name, denoise, SCHED, (3, 4, 8, 8), steps=8, eta=eta, progress=progress,
                      generator=torch.Generator().manual_seed(seed))[0]

    a, b, c = run(0), run(0, progress=True), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(3)
    d = sample(name, denoise, SCHED, (3, 4, 8, 8), steps=8, eta=eta)[0]  # global RNG when no generator
    torch.manual_seed(3)
    assert torch.equal(d, sample(name, denoise, SCHED, (3, 4, 8, 8), steps=8, eta=eta)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_the_same_samples_on_cuda():
    """Noise is drawn on the generator's device, so a CPU generator makes the run device-independent."""
    cpu_schedule, cuda_schedule = NoiseSchedule(), NoiseSchedule().cuda()

    def denoiser(schedule):
        def denoise(x, t):
            a = schedule.alpha_bar(t, F64).view(-1, 1, 1, 1)
            x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
            return x0, (x - a.sqrt() * x0) / (1 - a).sqrt()

        return denoise

    out = {}
    for schedule in (cpu_schedule, cuda_schedule):  # device follows the schedule's buffers
        out[schedule.betas.device.type], _ = sample("ddim", denoiser(schedule), schedule, (2, 4, 8, 8), steps=20,
                                                    eta=1.0, generator=torch.Generator().manual_seed(0))
    assert out["cuda"].device.type == "cuda" and out["cuda"].dtype == torch.float32
    torch.testing.assert_close(out["cuda"].cpu(), out["cpu"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- classifier-free guidance


class CountingModel:
    """out = x * (1 + cond) + t: distinct per condition, so the combination is checkable."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, vector=None, context=None):
        self.batches.append(x.shape[0])
        c = vector.to(x.dtype).sum(1) + context.to(x.dtype).sum((1, 2))
        return x * (1 + c.view(-1, *([1] * (x.dim() - 1)))) + t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _conditions():
    cond = {"vector": torch.randn(3, 4), "context": torch.randn(3, 2, 5)}
    uncond = {"vector": torch.zeros(3, 4), "context": torch.randn(1, 2, 5)}  # a null token sequence: batch 1
    return cond, uncond


def test_cfg_combines_both_branches_in_one_doubled_call():
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    cond, uncond = _conditions()
    model = CountingModel()
    out = guided_model_fn(model, cond, uncond, 1.5)(x, t)
    assert model.batches == [6]  # one call, doubled batch
    expanded = {"vector": uncond["vector"], "context": uncond["context"].expand(3, -1, -1)}
    out_c, out_u = model(x, t, **cond), model(x, t, **expanded)
    torch.testing.assert_close(out, out_u + 1.5 * (out_c - out_u))


def test_cfg_scale_one_and_zero_are_single_undoubled_calls():
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    cond, uncond = _conditions()
    uncond["context"] = uncond["context"].expand(3, -1, -1)
    model = CountingModel()
    torch.testing.assert_close(guided_model_fn(model, cond, uncond, 1.0)(x, t), model(x, t, **cond))
    torch.testing.assert_close(guided_model_fn(model, cond, uncond, 0.0)(x, t), model(x, t, **uncond))
    assert model.batches == [3, 3, 3, 3]


def test_cfg_with_tensor_conditions_and_any_parameterisation():
    """A null context (1, L, D) broadcasts over the batch; guiding v equals guiding eps (both affine in x_t)."""
    x, t = torch.randn(2, 2, 4, 4, dtype=F64), torch.tensor([100, 800])
    context, null_context = torch.randn(2, 3, 5, dtype=F64), torch.zeros(1, 3, 5, dtype=F64)

    def eps_net(x_t, tt, context):
        return torch.tanh(x_t) * context.mean((1, 2)).view(-1, 1, 1, 1) + 0.1 * x_t

    def v_net(x_t, tt, context):  # the same model, asked for v instead of eps
        x0, eps = make_denoiser(lambda a, b: eps_net(a, b, context), SCHED, "eps")(x_t, tt)
        return target_for("v", x0, eps, SCHED.alpha_bar(tt, F64))

    cond, uncond = {"context": context}, {"context": null_context}
    guided_eps = make_denoiser(guided_model_fn(eps_net, cond, uncond, 3.0), SCHED, "eps")(x, t)
    guided_v = make_denoiser(guided_model_fn(v_net, cond, uncond, 3.0), SCHED, "v")(x, t)
    for a, b in zip(guided_eps, guided_v):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ starting from an image
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_image_to_image_at_strength_0_returns_the_input_and_at_1_ignores_it(name):
    x0 = torch.randn(4, 3, generator=_gen(7), dtype=F64)
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return gaussian_denoiser(MU, S)(x, t)

    out, spec = sample(name, counting, SCHED, (4, 3), steps=10, image=FromImage(x0, strength=0.0), dtype=F64,
                       generator=_gen(0))
    assert torch.equal(out, x0) and calls == [] and spec.timesteps == () and spec.strength == 0.0
    without = sample(name, counting, SCHED, (4, 3), steps=10, generator=_gen(1), dtype=F64)[0]
    for other in (x0, -3 * x0):
        with_image = sample(name, counting, SCHED, (4, 3), steps=10, generator=_gen(1), dtype=F64,
                            image=FromImage(other, strength=1.0))[0]
        assert torch.equal(with_image, without)
    with pytest.raises(ConfigError, match=r"strength must be in \[0, 1\]"):
        FromImage(x0, strength=1.5)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_sdedit_runs_the_last_timesteps_from_the_input_noised_by_x_T(name):
    x0, x_T = torch.randn(3, 5, generator=_gen(2), dtype=F64), torch.randn(3, 5, generator=_gen(3), dtype=F64)
    first = []
    out, spec = sample(name, gaussian_denoiser(MU, 0.0), SCHED, (3, 5), steps=10, x_T=x_T, dtype=F64,
                       generator=_gen(0), image=FromImage(x0, strength=0.3),
                       callback=lambda i, t, x, x0_hat: first.append(x.clone()) if i == 0 else None)
    assert spec.timesteps == tuple(reversed(timesteps(1000, 10, "trailing")))[-3:] and spec.strength == 0.3
    a = AB[spec.timesteps[0]]
    torch.testing.assert_close(first[0], math.sqrt(a) * x0 + math.sqrt(1 - a) * x_T, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.full_like(out, MU))  # single-point data: every path ends on it


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_inpainting_by_replacement_keeps_the_known_region_and_noises_it_to_each_level(name):
    n, d, known = 256, 8, 3
    x0 = torch.randn(n, d, generator=_gen(4), dtype=F64)
    keep = (torch.arange(d) < known).to(F64)
    standardized = []

    def record(i, t, x, x0_hat):  # the known region of x_t, standardised: N(0, 1) if it is x0 noised to t
        a = AB[t]
        standardized.append((x[:, :known] - math.sqrt(a) * x0[:, :known]) / math.sqrt(1 - a))

    out, _ = sample(name, gaussian_denoiser(MU, 0.0), SCHED, (n, d), steps=10, dtype=F64, generator=_gen(5),
                    image=FromImage(x0, keep=keep), callback=record)
    assert torch.equal(out[:, :known], x0[:, :known])
    torch.testing.assert_close(out[:, known:], torch.full_like(out[:, known:], MU))  # the rest: the data point
    z = torch.stack(standardized)
    assert len(standardized) == 10 and abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


def test_the_models_sampling_node_is_checked_in_one_line_each():
    from lightning_ldm.diffusion.samplers import SamplerSettings

    assert SamplerSettings.from_config(None) == SamplerSettings("dpmpp_2m", 20, None, 1.0)
    assert SamplerSettings.from_config({"sampler": "ddim", "eta": 0.5}).as_dict() == {
        "sampler": "ddim", "steps": 20, "eta": 0.5, "guidance_scale": 1.0}
    for node, message in [({"sampler_steps": 4}, r"module.sampling has no sampler_steps; it takes sampler, steps"),
                          ({"sampler": "euler"}, r"module.sampling.sampler='euler' is unknown; use one of ddpm"),
                          ({"steps": 0}, r"module.sampling.steps must be at least 1, got 0")]:
        with pytest.raises(ConfigError, match=message) as error:
            SamplerSettings.from_config(node)
        assert "\n" not in str(error.value)
