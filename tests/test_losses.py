"""Stage-1 loss: nll reductions, regulariser weights, the adaptive GAN weight, disc_start gating, D losses."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_ldm.errors import ConfigError, MissingWeightsError
from lightning_ldm.losses import AutoencoderLoss, PatchDiscriminator, hinge_d_loss, vanilla_d_loss
from lightning_ldm.losses.lpips import VGG16_FILENAME


def make_loss(**overrides) -> AutoencoderLoss:
    """A small loss without LPIPS: 16x16 inputs give a 2x2 logit map with 2 discriminator layers."""
    kwargs = dict(perceptual_weight=0.0, disc_ndf=8, disc_layers=2, disc_norm="none", disc_start=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return AutoencoderLoss(**kwargs)


class TinyDecoder(nn.Module):
    """Stands in for the decoder: its last conv's weight is the adaptive weight's `last_layer`."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(2, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.hidden(z)))


def decoder_batch(seed: int = 0) -> tuple[TinyDecoder, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    decoder = TinyDecoder()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = decoder(torch.randn(2, 2, 16, 16))
    return decoder, x, x_hat


def grad_of(loss: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    return torch.autograd.grad(loss, param, retain_graph=True)[0]


@pytest.mark.parametrize("disc_norm", ["none", "batch"])
def test_adaptive_weight_is_the_ratio_of_gradient_norms(disc_norm: str) -> None:
    loss = make_loss(disc_weight=0.5, disc_factor=0.7, kl_weight=0.1, disc_norm=disc_norm)
    with torch.no_grad():  # a tiny freshly initialised D is nearly constant: make its gradient count
        for conv in (m for m in loss.discriminator.modules() if isinstance(m, nn.Conv2d)):
            conv.weight.mul_(10)
    decoder, x, x_hat = decoder_batch()
    last = decoder.out.weight
    kl = torch.tensor(3.0)
    total, logs = loss.generator_loss(x, x_hat, kl, "kl", last, step=0)

    # Independently: logvar = 0 and "sum" reduction make nll = sum|x - x_hat| / N.
    nll = (x - x_hat).abs().sum() / 2
    g_loss = -loss.discriminator(x_hat).mean()
    ratio = grad_of(nll, last).norm() / (grad_of(g_loss, last).norm() + 1e-4)
    expected_weight = 0.5 * ratio
    assert 0 < ratio < 1e4
    torch.testing.assert_close(logs["d_weight"], expected_weight)
    torch.testing.assert_close(logs["g_loss"], g_loss.detach())
    torch.testing.assert_close(total, nll + 0.1 * kl + expected_weight * 0.7 * g_loss)

    # d_weight is a constant: the gradient of the total is grad nll + d_weight * disc_factor * grad g_loss.
    assert not logs["d_weight"].requires_grad
    expected_grad = grad_of(nll, last) + expected_weight * 0.7 * grad_of(g_loss, last)
    torch.testing.assert_close(grad_of(total, last), expected_grad)


def test_adaptive_weight_is_clamped() -> None:
    loss = make_loss(disc_weight=0.5)
    with torch.no_grad():  # a near-constant discriminator: its gradient at the decoder almost vanishes
        loss.discriminator.layers[-1].weight.mul_(1e-9)
    decoder, x, x_hat = decoder_batch()
    nll = (x - x_hat).abs().sum() / 2
    g_loss = -loss.discriminator(x_hat).mean()
    assert grad_of(nll, decoder.out.weight).norm() / (grad_of(g_loss, decoder.out.weight).norm() + 1e-4) > 1e4
    _, logs = loss.generator_loss(x, x_hat, torch.tensor(0.0), "kl", decoder.out.weight, step=0)
    torch.testing.assert_close(logs["d_weight"], torch.tensor(1e4 * 0.5))


class Counter:
    def __init__(self) -> None:
        self.calls = 0


@pytest.fixture
def autograd_grad_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counter = Counter()
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        counter.calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    return counter


def test_nothing_of_the_discriminator_runs_before_disc_start(autograd_grad_calls: Counter) -> None:
    loss = make_loss(disc_start=10)
    d_forwards = Counter()
    loss.discriminator.register_forward_hook(lambda *_: setattr(d_forwards, "calls", d_forwards.calls + 1))
    decoder, x, x_hat = decoder_batch()
    kl = torch.tensor(2.0)

    assert not loss.discriminator_active(9) and loss.discriminator_active(10)
    total, logs = loss.generator_loss(x, x_hat, kl, "kl", decoder.out.weight, step=9)
    assert d_forwards.calls == 0 and autograd_grad_calls.calls == 0
    torch.testing.assert_close(total, (x - x_hat).abs().sum() / 2 + 1e-6 * kl)
    assert logs["d_weight"] == 0 and logs["g_loss"] == 0
    with pytest.raises(RuntimeError, match="disc_start"):
        loss.discriminator_loss(x, x_hat, step=9)
    assert d_forwards.calls == 0

    loss.generator_loss(x, x_hat, kl, "kl", decoder.out.weight, step=10)
    assert d_forwards.calls == 1 and autograd_grad_calls.calls == 2
    loss.discriminator_loss(x, x_hat, step=10)
    assert d_forwards.calls == 3


def test_without_gradients_the_gan_weight_is_zero(autograd_grad_calls: Counter) -> None:
    loss = make_loss()
    decoder, x, _ = decoder_batch()
    with torch.no_grad():  # validation
        x_hat = decoder(torch.randn(2, 2, 16, 16))
        total, logs = loss.generator_loss(x, x_hat, torch.tensor(1.0), "kl", decoder.out.weight, step=100)
    assert autograd_grad_calls.calls == 0
    assert logs["d_weight"] == 0 and logs["g_loss"] != 0
    torch.testing.assert_close(total, (x - x_hat).abs().sum() / 2 + 1e-6)


@pytest.mark.parametrize("pixel_loss, per_element", [("l1", 0.3), ("l2", 0.09)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_nll_reductions(pixel_loss: str, per_element: float, reduction: str) -> None:
    loss = make_loss(pixel_loss=pixel_loss, nll_reduction=reduction, logvar_init=0.5, disc_start=10**9)
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full_like(x, -0.3)
    nll, logs = loss.reconstruction_nll(x, x_hat)
    element = per_element / math.exp(0.5) + 0.5  # rec / exp(logvar) + logvar
    expected = element * 3 * 4 * 4 if reduction == "sum" else element  # sum: over C,H,W and mean over N
    assert nll.item() == pytest.approx(expected, rel=1e-6)
    assert logs["rec_loss"].item() == pytest.approx(per_element, rel=1e-6)
    assert logs["nll_loss"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("regularizer, weight_key", [("kl", "kl_weight"), ("vq", "codebook_weight")])
def test_regularizer_weighting(regularizer: str, weight_key: str) -> None:
    loss = make_loss(kl_weight=1e-3, codebook_weight=0.25, disc_start=10**9)
    decoder, x, x_hat = decoder_batch()
    reg = torch.tensor(7.0, requires_grad=True)
    total, logs = loss.generator_loss(x, x_hat, reg, regularizer, decoder.out.weight, step=0)
    nll, _ = loss.reconstruction_nll(x, x_hat)
    weight = getattr(loss, weight_key)
    torch.testing.assert_close(total, nll + weight * 7.0)
    assert logs[f"{regularizer}_loss"] == 7.0
    assert set(logs) >= {"rec_loss", "nll_loss", f"{regularizer}_loss", "g_loss", "d_weight", "logvar", "total_loss"}
    assert not any(v.requires_grad for v in logs.values())
    total.backward()
    assert reg.grad.item() == pytest.approx(weight)
    with pytest.raises(ValueError):
        loss.generator_loss(x, x_hat, reg, "kld", decoder.out.weight, step=0)


@pytest.mark.parametrize("learn", [True, False])
def test_logvar_is_learned_only_when_asked(learn: bool) -> None:
    loss = make_loss(learn_logvar=learn, logvar_init=0.2, disc_start=10**9)
    decoder, x, x_hat = decoder_batch()
    total, logs = loss.generator_loss(x, x_hat, torch.tensor(0.0), "kl", decoder.out.weight, step=0)
    total.backward()
    assert logs["logvar"].item() == pytest.approx(0.2)
    if learn:
        assert loss.generator_parameters() == [loss.logvar]
        # d/dlv of sum(|d| e^-lv + lv) / N = (numel - sum|d| e^-lv) / N
        abs_sum = (x - x_hat).abs().sum().item()
        expected = (x.numel() - abs_sum * math.exp(-0.2)) / 2
        assert loss.logvar.grad.item() == pytest.approx(expected, rel=1e-5)
    else:
        assert loss.generator_parameters() == [] and loss.logvar.grad is None
    params = set(map(id, loss.discriminator_parameters()))
    assert params == set(map(id, loss.discriminator.parameters())) and id(loss.logvar) not in params


def test_d_loss_functions_against_hand_values() -> None:
    real = torch.tensor([0.5, 2.0, -1.0])
    fake = torch.tensor([-2.0, 0.5, 0.0])
    # hinge: relu(1 - real) = [0.5, 0, 2], relu(1 + fake) = [0, 1.5, 1]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in [0.5, 2.0, -1.0]) / 3 + sum(softplus(f) for f in [-2.0, 0.5, 0.0]) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind, fn", [("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)])
def test_discriminator_loss(kind: str, fn) -> None:
    loss = make_loss(disc_loss=kind, disc_factor=0.5)
    decoder, x, x_hat = decoder_batch()
    d_loss, logs = loss.discriminator_loss(x, x_hat, step=0)
    logits_real, logits_fake = loss.discriminator(x), loss.discriminator(x_hat)
    torch.testing.assert_close(d_loss, 0.5 * fn(logits_real, logits_fake))
    torch.testing.assert_close(logs["logits_real"], logits_real.mean().detach())
    torch.testing.assert_close(logs["logits_fake"], logits_fake.mean().detach())
    d_loss.backward()  # trains D only: the reconstruction is detached
    assert all(p.grad is None for p in decoder.parameters())
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_discriminator_architecture() -> None:
    # taming's NLayerDiscriminator: 3136 + 131328 + 524800 + 2098176 + 8193 (BN affine instead of conv biases)
    assert sum(p.numel() for p in PatchDiscriminator().parameters()) == 2_765_633
    assert sum(p.numel() for p in PatchDiscriminator(norm="none").parameters()) == 2_764_737
    torch.manual_seed(0)
    disc = PatchDiscriminator(norm="group")
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in disc.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in PatchDiscriminator().modules()) == 3
    big_conv = disc.layers[8].weight  # 256 -> 512, stride 1
    assert big_conv.shape == (512, 256, 4, 4) and disc.layers[8].stride == (1, 1)
    assert big_conv.std().item() == pytest.approx(0.02, rel=0.02) and abs(big_conv.mean().item()) < 1e-3
    assert disc.layers[9].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert disc(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # 70x70 patches
    assert PatchDiscriminator(in_channels=1, ndf=8, n_layers=1)(torch.randn(2, 1, 16, 16)).shape == (2, 1, 6, 6)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="loss.kl_weight"):
        make_loss(kl_weight=-1.0)
    with pytest.raises(ConfigError, match="loss.disc_loss"):
        make_loss(disc_loss="wgan")
    with pytest.raises(ConfigError, match="image_channels"):
        make_loss(perceptual_weight=1.0, image_channels=4)
    with pytest.raises(ConfigError, match="disc_ndf"):
        make_loss(disc_norm="group", disc_ndf=8)


def test_missing_vgg_weights_stop_the_run_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=str(tmp_path)):
        AutoencoderLoss(perceptual_weight=1.0)
    loss = make_loss(perceptual_weight=0.0)
    assert not loss.uses_lpips and loss.lpips is None


@pytest.fixture(scope="module")
def lpips_loss(tmp_path_factory: pytest.TempPathFactory) -> AutoencoderLoss:
    """With LPIPS on a random VGG16 trunk (the distance's structure, not its calibration, is under test)."""
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILENAME
    torch.save(features, path)
    return make_loss(perceptual_weight=0.8, lpips_weights=str(path), disc_start=10**9)


def test_perceptual_term_is_broadcast_per_pixel(lpips_loss: AutoencoderLoss) -> None:
    lpips_loss.train()
    assert lpips_loss.uses_lpips and not lpips_loss.lpips.training
    assert not any(p.requires_grad for p in lpips_loss.lpips.parameters())
    decoder, x, x_hat = decoder_batch()
    nll, logs = lpips_loss.reconstruction_nll(x, x_hat)
    distance = lpips_loss.lpips(x, x_hat)
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    # "sum": every one of the C*H*W elements carries the image's LPIPS distance.
    expected = ((x - x_hat).abs().sum() + 0.8 * distance.sum() * 3 * 16 * 16) / 2
    torch.testing.assert_close(nll, expected)
    torch.testing.assert_close(logs["perceptual_loss"], distance.mean().detach())
    nll.backward()
    assert decoder.out.weight.grad is not None


def test_greyscale_is_repeated_to_rgb_for_lpips(lpips_loss: AutoencoderLoss) -> None:
    torch.manual_seed(3)
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    seen_shapes = []
    hook = lpips_loss.lpips.register_forward_pre_hook(lambda _, args: seen_shapes.extend(a.shape for a in args))
    try:
        distance = lpips_loss.perceptual_distance(x, y)
    finally:
        hook.remove()
    assert seen_shapes == [(2, 3, 16, 16), (2, 3, 16, 16)]  # VGG sees RGB, not a broadcast single channel
    torch.testing.assert_close(distance, lpips_loss.lpips(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
