"""The stage-1 LightningModule: batch counting, discriminator gating, accumulation, the NaN guard."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.autoencoder.module import AutoencoderModule
from lightning_ldm.errors import ConfigError, NonFiniteLossError
from lightning_ldm.losses.autoencoder_loss import AutoencoderLoss


class TinyImages(L.LightningDataModule):
    """Random 1-channel 8x8 images; ``poison`` puts a NaN in every image."""

    def __init__(self, n: int = 32, size: int = 16, poison: bool = False, batch_size: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, size, size, generator=generator) * 2 - 1
        if poison:
            self.images[:, :, 0, 0] = float("nan")
        self.image_size, self.channels, self.batch_size = size, 1, batch_size

    def _loader(self):
        data = [{"image": image, "label": 0} for image in self.images]
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def make_module(max_steps=6, disc_start=3, accumulate=1, clip=None, **loss_kwargs) -> AutoencoderModule:
    torch.manual_seed(0)
    autoencoder = Autoencoder(in_channels=1, **{**SMALL_PRESETS["kl-f2-small"], "resolution": 16})
    loss = AutoencoderLoss(image_channels=1, perceptual_weight=0.0, disc_start=disc_start, disc_ndf=32,
                           disc_layers=2, **loss_kwargs)
    return AutoencoderModule(autoencoder=autoencoder, loss=loss, max_steps=max_steps, lr=1e-3,
                             accumulate_grad_batches=accumulate, grad_clip_norm=clip, image_log_every=0,
                             num_log_images=2)


def fit(module, tmp_path, data=None, **trainer_kwargs):
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, datamodule=data or TinyImages())
    return trainer


def test_max_steps_counts_batches_not_optimizer_steps(tmp_path):
    module = make_module(max_steps=6, disc_start=2)
    trainer = fit(module, tmp_path)
    assert module.batch_step == 6
    # Lightning's own counter advanced once per generator step and once per discriminator step (batches 2..5).
    assert trainer.global_step == 6 + 4


def test_a_training_time_budget_stops_the_run_resumably(tmp_path):
    """max_train_seconds is read every TIME_CHECK_EVERY batches: with a budget already spent at the first check,
    the run stops there (not at max_steps) and leaves last.ckpt, like a run that reached max_steps."""
    module = make_module(max_steps=1000, disc_start=100)
    module.max_train_seconds = 1e-6
    fit(module, tmp_path)
    assert module.batch_step == module.TIME_CHECK_EVERY
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["batch_step"] == module.TIME_CHECK_EVERY and checkpoint["training_seconds"] > 0


def test_discriminator_is_not_touched_before_disc_start(tmp_path, monkeypatch):
    module = make_module(max_steps=5, disc_start=3)
    calls = []
    module.loss.discriminator.register_forward_hook(lambda *args: calls.append(module.batch_step))
    before = [p.detach().clone() for p in module.loss.discriminator.parameters()]
    grads = []
    original = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(module.batch_step) or original(*a, **k))
    fit(module, tmp_path)
    assert min(calls) == 3 and min(grads) == 3
    after = list(module.loss.discriminator.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))  # and it trains once active


def test_disc_start_at_max_steps_trains_without_the_discriminator_and_says_so(tmp_path, capsys):
    """The CIFAR-10 presets set disc_start: ${max_steps}: no adversarial batch at all, announced at fit start."""
    module = make_module(max_steps=3, disc_start=3)
    calls = []
    module.loss.discriminator.register_forward_hook(lambda *args: calls.append(module.batch_step))
    fit(module, tmp_path)
    assert module.batch_step == 3 and calls == []
    assert "discriminator off (disc_start 3 >= max_steps 3)" in capsys.readouterr().out
    fit(make_module(max_steps=4, disc_start=3), tmp_path / "on")
    assert "discriminator from batch 3" in capsys.readouterr().out


def test_each_network_gets_exactly_the_gradient_of_its_own_loss(tmp_path):
    """One backward pass through g_loss + d_loss: the autoencoder's gradient must be that of g_loss alone and the
    discriminator's that of d_loss alone (g_loss reaches D frozen, d_loss sees the reconstruction detached)."""
    module = make_module(max_steps=1, disc_start=0)
    module.sample_posterior = False  # deterministic, so the reference below sees the same reconstruction
    data = TinyImages()
    reference = copy.deepcopy(module).train()
    x = data.images[:data.batch_size]
    out = reference.autoencoder(x, sample_posterior=False)
    g_loss, _ = reference.loss.generator_loss(x, out.reconstruction, out.regularization_loss,
                                              reference.autoencoder.regularizer, reference.autoencoder.last_layer(), 0)
    expected_g = torch.autograd.grad(g_loss, list(reference.autoencoder.parameters()), retain_graph=True)
    d_loss, _ = reference.loss.discriminator_loss(x, out.reconstruction.detach(), 0)
    expected_d = torch.autograd.grad(d_loss, reference.loss.discriminator_parameters())

    seen = {}
    original_step = module._step

    def record(optimizer, loss, name):
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        seen[name] = [p.grad.clone() for p in params]
        original_step(optimizer, loss, name)

    module._step = record
    fit(module, tmp_path, data=data)
    assert len(seen["generator"]) == len(expected_g) and len(seen["discriminator"]) == len(expected_d)
    for got, want in zip(seen["generator"] + seen["discriminator"], expected_g + expected_d):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    # Every D weight learns (the last bias may not: with every hinge term active its gradient is exactly 0).
    assert all(bool(g.abs().sum() > 0) for g in expected_d[:-1])


@pytest.mark.parametrize("disc_start", [0, 100])
def test_every_trained_parameter_gets_a_gradient_in_every_backward_pass(tmp_path, disc_start):
    """What lets DDP run without find_unused_parameters: a parameter left without a gradient would make its
    reducer copy the used-parameter map to the host after that backward pass (a GPU sync), or, without
    find_unused_parameters, fail at the next batch. Before disc_start the discriminator gets a zero gradient."""
    module = make_module(max_steps=3, disc_start=disc_start)
    missing = []
    original = module.manual_backward

    def backward(loss, *args, **kwargs):
        original(loss, *args, **kwargs)
        # What DDP reduces: the parameters of both optimizers, whether or not toggled off at this moment.
        trained = {id(p) for opt in module.optimizers() for group in opt.optimizer.param_groups
                   for p in group["params"]}
        missing.append([n for n, p in module.named_parameters() if id(p) in trained and p.grad is None])

    module.manual_backward = backward
    fit(module, tmp_path)
    assert missing == [[], [], []]


def test_accumulation_steps_once_per_n_batches(tmp_path):
    module = make_module(max_steps=6, disc_start=100, accumulate=3)
    steps = []
    original_step = module._step
    module._step = lambda optimizer, *rest: (steps.append(module.batch_step), original_step(optimizer, *rest))
    fit(module, tmp_path)
    assert steps == [2, 5]


def test_gradient_clipping_bounds_the_norm(tmp_path):
    module = make_module(max_steps=1, disc_start=100, clip=1e-3)
    norms = []

    def step(optimizer, *rest):
        module.clip_gradients(optimizer, gradient_clip_val=module.grad_clip_norm, gradient_clip_algorithm="norm")
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
        optimizer.zero_grad()

    module._step = step
    fit(module, tmp_path)
    assert norms[0] <= 1e-3 * 1.0001


def test_nan_loss_stops_with_a_checkpoint(tmp_path):
    module = make_module(max_steps=6)
    initial = {k: v.clone() for k, v in module.autoencoder.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="generator loss is nan at batch 0") as info:
        fit(module, tmp_path, data=TinyImages(poison=True))
    path = tmp_path / "checkpoints" / "nonfinite-step0.ckpt"
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    # Every step was non-finite, so every step was skipped on the device: the weights are the initial ones,
    # the optimizer never counted a step, and the run stopped DELAY batches after the first bad one.
    saved = {k[len("autoencoder."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("autoencoder.")}
    assert all(torch.equal(saved[k], initial[k]) for k in initial)
    assert checkpoint["batch_step"] == 2
    adam_steps = [float(s["step"]) for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert adam_steps and set(adam_steps) == {0.0}


def test_nan_at_the_last_batch_is_still_caught(tmp_path):
    module = make_module(max_steps=1)
    with pytest.raises(NonFiniteLossError, match="at batch 0"):
        fit(module, tmp_path, data=TinyImages(poison=True))


def test_image_size_must_be_divisible_by_f(tmp_path):
    module = make_module()
    module.autoencoder = Autoencoder(in_channels=1, **{**SMALL_PRESETS["kl-f4-small"], "resolution": 16})
    with pytest.raises(ConfigError, match="data.image_size=18 is not divisible .* f=4"):
        fit(module, tmp_path, data=TinyImages(size=18))
