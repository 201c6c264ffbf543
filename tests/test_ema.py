"""EMA of the stage-2 UNet: the update rule, its warm-up, its state, and when it runs."""

import functools

import lightning as L
import pytest
import torch
from torch import nn

from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.latent.first_stage import load_first_stage
from lightning_ldm.training.ema import EMA
from lightning_ldm.unet.model import PRESETS, UNet
from few_digits import FewDigits


class Net(nn.Module):
    """Parameters and a buffer (BatchNorm running statistics), in float64 so expected values are exact."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)
        self.double()


def fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(value + torch.arange(p.numel(), dtype=p.dtype).view_as(p) * 0.1 + i)


def test_one_update_is_the_convex_combination_with_the_warm_up_decay():
    model = Net()
    fill(model, 1.0)
    ema = EMA(model, decay=0.999)
    fill(ema.model, -2.0)  # a known EMA state unlike the model
    ema.num_updates = 5
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(model)
    d = min(0.999, (1 + 5) / (10 + 5))
    for e, b, p in zip(ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, d * b + (1 - d) * p, rtol=1e-14, atol=1e-14)
    assert ema.num_updates == 6


def test_after_warm_up_the_configured_decay_applies():
    model = Net()
    fill(model, 1.0)
    ema = EMA(model, decay=0.9)
    fill(ema.model, 0.0)
    ema.num_updates = 1000  # (1 + n)/(10 + n) = 0.991 > 0.9
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(model)
    for e, b, p in zip(ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p, rtol=1e-14, atol=1e-14)


def test_warm_up_decays_follow_one_plus_n_over_ten_plus_n():
    model = Net()
    ema = EMA(model, decay=0.9999)
    seen = []
    expected_state = [p.clone() for p in ema.model.parameters()]
    for step in range(3):
        fill(model, float(step + 1))
        seen.append(ema.current_decay())
        d = seen[-1]
        expected_state = [d * e + (1 - d) * p for e, p in zip(expected_state, model.parameters())]
        ema.update(model)
    assert seen == pytest.approx([0.1, 2 / 11, 3 / 12], abs=1e-15)
    for e, expected in zip(ema.model.parameters(), expected_state):
        torch.testing.assert_close(e, expected, rtol=1e-14, atol=1e-14)


def test_without_warm_up_the_decay_is_constant():
    model = Net()
    ema = EMA(model, decay=0.95, warmup=False)
    decays = []
    for _ in range(4):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == [0.95] * 4


def test_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError):
        EMA(Net(), decay=1.0)


def test_buffers_are_copied_not_averaged():
    model = Net()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.norm.running_mean.copy_(torch.tensor([3.0, -4.0], dtype=torch.float64))
        model.norm.num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.equal(ema.model.norm.running_mean, model.norm.running_mean)
    assert int(ema.model.norm.num_batches_tracked) == 7


def test_averaged_copy_is_frozen_and_always_in_eval_mode():
    ema = EMA(Net())
    ema.train()
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert not any(m.training for m in ema.model.modules())


def test_num_updates_survives_a_state_dict_round_trip():
    parent = nn.Module()
    parent.ema = EMA(Net())
    for _ in range(3):
        parent.ema.update(Net())
    state = parent.state_dict()
    assert "ema._extra_state" in state

    restored = nn.Module()
    restored.ema = EMA(Net())
    restored.load_state_dict(state, strict=True)
    assert restored.ema.num_updates == 3
    assert restored.ema.current_decay() == pytest.approx(4 / 13)
    for a, b in zip(restored.ema.model.parameters(), parent.ema.model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- inside training
def test_ema_updates_once_per_optimizer_step_not_per_micro_batch(tmp_path):
    torch.manual_seed(0)
    data = FewDigits(batch_size=2)
    export = save_autoencoder_export(Autoencoder(**{**SMALL_PRESETS["kl-f2-small"], "in_channels": 1}),
                                     tmp_path / "export/autoencoder.safetensors", data=data.identity())
    module = DiffusionModule(first_stage=load_first_stage(path=str(export)),
                             unet=functools.partial(UNet, **PRESETS["tiny"]), schedule=NoiseSchedule(),
                             image_size=32, scale_estimation_batches=1, num_log_images=0, lr=1e-3)
    steps = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(pl_module.ema.num_updates)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4, limit_val_batches=0,
                        accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    assert module.batch_step == 4
    assert trainer.global_step == 2
    assert module.ema.num_updates == 2
    assert steps == [0, 1, 1, 2]  # the update follows the second micro-batch of each pair
    # the EMA moved towards the trained weights but is not a copy of them
    ema_params = torch.cat([p.flatten() for p in module.ema.model.parameters()])
    unet_params = torch.cat([p.flatten() for p in module.unet.parameters()])
    assert not torch.equal(ema_params, unet_params)

