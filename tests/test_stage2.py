"""Stage 2 end to end on tiny models: the frozen first stage, strict loading, sampling from a checkpoint alone,
the sampling task, class conditioning with guidance, and the loss for every prediction target."""

import functools
import math
import os
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.diffusion.checkpoint import load_diffusion_model, save_ema_export
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import CheckpointError
from lightning_ldm.latent.first_stage import identity_first_stage, load_first_stage, newest_matching_export
from lightning_ldm.tasks.sample import sample
from lightning_ldm.unet.model import PRESETS, UNet
from few_digits import FewDigits

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = functools.partial(UNet, **PRESETS["tiny"])


def make_export(path, data_identity: dict, preset: str = "kl-f2-small", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_autoencoder_export(Autoencoder(**{**SMALL_PRESETS[preset], "in_channels": 1}), path,
                                   data=data_identity)


def make_trainer(root, max_steps: int, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(root))
    return L.Trainer(**{**options, **kwargs})


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# --------------------------------------------------------------------------- one trained run, shared
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three training steps of an unconditional stage 2, checkpointed; the stage-1 export is then DELETED, so
    every later use proves that the checkpoint alone is enough."""
    root = tmp_path_factory.mktemp("stage2")
    data = FewDigits(batch_size=4)
    export = make_export(root / "stage1/export/autoencoder.safetensors", data.identity())
    module = DiffusionModule(first_stage=load_first_stage(path=str(export)), unet=TINY_UNET,
                             schedule=NoiseSchedule(), image_size=32, scale_estimation_batches=2, num_log_images=0,
                             lr=2e-3, ema_decay=0.9, sampling={"steps": 4})
    first_stage_before = {k: v.clone() for k, v in module.first_stage.state_dict().items() if k != "scale_factor"}
    seen = types.SimpleNamespace(first_stage_training=[], first_stage_grads=[])

    class Probe(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.train()  # whatever switches the module to train mode must not reach the first stage

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.first_stage_training.append(any(m.training for m in pl_module.first_stage.modules()))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.first_stage_grads.append(any(p.grad is not None for p in pl_module.first_stage.parameters()))

    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "diffusion/run/checkpoints", save_last=True)
    trainer = make_trainer(root / "diffusion/run", 3, callbacks=[Probe(), checkpoints], enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    export.unlink()
    module.eval()
    return types.SimpleNamespace(root=root, module=module, trainer=trainer, seen=seen, data=data,
                                 first_stage_before=first_stage_before,
                                 last=root / "diffusion/run/checkpoints/last.ckpt")


def test_first_stage_stays_frozen_through_training(trained):
    module = trained.module
    after = module.first_stage.state_dict()
    for key, before in trained.first_stage_before.items():
        assert torch.equal(after[key], before), key
    assert all(not p.requires_grad for p in module.first_stage.parameters())
    assert trained.seen.first_stage_training == [False] * 3
    assert trained.seen.first_stage_grads == [False] * 3
    module.train()
    assert not any(m.training for m in module.first_stage.modules())
    assert module.unet.training  # train() still reaches the network being trained
    module.eval()


def test_only_the_unet_is_optimised_and_averaged(trained):
    module = trained.module  # unconditional: the conditioner holds no parameters
    optimised = {id(p) for group in trained.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.unet.parameters()}
    assert optimised.isdisjoint(id(p) for p in module.first_stage.parameters())
    assert sum(p.numel() for p in module.ema.parameters()) == sum(p.numel() for p in module.unet.parameters())
    assert list(module.ema.model.state_dict()) == [f"unet.{key}" for key in module.unet.state_dict()]
    assert module.ema.num_updates == 3


# --------------------------------------------------------------------------- strict loading
def test_load_first_stage_refuses_missing_and_foreign_files(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError) as error:
        load_first_stage(path=str(missing))
    assert_one_line(error, str(missing))

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(3, 3)}, str(foreign))
    with pytest.raises(CheckpointError) as error:
        load_first_stage(path=str(foreign))
    assert_one_line(error, str(foreign), "not a lightning_ldm autoencoder export")

    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError) as error:
        load_first_stage(path=str(text))
    assert_one_line(error, str(text))


def test_load_first_stage_refuses_weights_that_do_not_fit_the_config(tmp_path):
    export = make_export(tmp_path / "good.safetensors", {"name": "digits"})
    with safe_open(str(export), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["post_quant_conv.weight"] = torch.zeros(4, 4, 3, 3)  # a 1x1 conv in the config
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata=metadata)
    with pytest.raises(CheckpointError) as error:
        load_first_stage(path=str(tampered))
    assert_one_line(error, str(tampered), "post_quant_conv.weight")

    del tensors["post_quant_conv.weight"]
    incomplete = tmp_path / "incomplete.safetensors"
    save_file(tensors, str(incomplete), metadata=metadata)
    with pytest.raises(CheckpointError) as error:
        load_first_stage(path=str(incomplete))
    assert_one_line(error, str(incomplete), "post_quant_conv.weight")


def test_load_diffusion_model_refuses_missing_foreign_and_incomplete_checkpoints(trained, tmp_path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError) as error:
        load_diffusion_model(str(missing))
    assert_one_line(error, str(missing))

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError) as error:
        load_diffusion_model(str(foreign))
    assert_one_line(error, str(foreign), "not a lightning_ldm stage-2 checkpoint")

    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError) as error:
        load_diffusion_model(str(text))
    assert_one_line(error, str(text))

    checkpoint = torch.load(trained.last, map_location="cpu", weights_only=False)
    del checkpoint["state_dict"]["unet.conv_in.weight"]
    incomplete = tmp_path / "incomplete.ckpt"
    torch.save(checkpoint, incomplete)
    with pytest.raises(CheckpointError) as error:
        load_diffusion_model(str(incomplete))
    assert_one_line(error, str(incomplete), "unet.conv_in.weight")

    del checkpoint["state_dict"]
    torch.save(checkpoint, incomplete)
    with pytest.raises(CheckpointError) as error:
        load_diffusion_model(str(incomplete))
    assert_one_line(error, str(incomplete))


def test_newest_matching_export_picks_the_newest_of_the_same_data(tmp_path):
    data = DigitsDataModule()
    old = make_export(tmp_path / "runs/a/export/autoencoder.safetensors", data.identity())
    new = make_export(tmp_path / "runs/b/export/autoencoder.safetensors", data.identity())
    other = make_export(tmp_path / "runs/c/export/autoencoder.safetensors", DigitsDataModule(image_size=16).identity())
    broken = tmp_path / "runs/d/export/autoencoder.safetensors"
    broken.parent.mkdir(parents=True)
    broken.write_text("not an export")
    now = 1_700_000_000
    for offset, path in enumerate([old, new, other, broken]):
        os.utime(path, (now + 100 * offset, now + 100 * offset))
    assert newest_matching_export(tmp_path / "runs", data.identity()) == new
    os.utime(old, (now + 1000, now + 1000))
    assert newest_matching_export(tmp_path / "runs", data.identity()) == old
    assert load_first_stage(search_root=str(tmp_path / "runs"), data=data).source == str(old)

    with pytest.raises(CheckpointError) as error:
        newest_matching_export(tmp_path / "runs", DigitsDataModule(image_size=64).identity())
    assert_one_line(error, str(tmp_path / "runs"), "stage=autoencoder", "autoencoder.path")


# --------------------------------------------------------------------------- a checkpoint alone can sample
def fixed_noise(module: DiffusionModule, n: int) -> torch.Tensor:
    shape = (n, module.first_stage.latent_channels, module.latent_size, module.latent_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(123))


def test_last_checkpoint_alone_reproduces_the_trained_model(trained):
    assert not (trained.root / "stage1/export/autoencoder.safetensors").exists()
    loaded = load_diffusion_model(str(trained.last)).eval()
    module = trained.module
    assert float(loaded.first_stage.scale_factor) == float(module.first_stage.scale_factor)
    assert loaded.ema.num_updates == module.ema.num_updates == 3
    assert loaded.batch_step == 3
    x_T = fixed_noise(module, 2)
    expected, _ = module.generate(2, x_T=x_T, generator=torch.Generator().manual_seed(0))
    images, spec = loaded.generate(2, x_T=x_T, generator=torch.Generator().manual_seed(0))
    assert spec.name == "dpmpp_2m" and spec.steps == 4  # the sampler settings travel with the checkpoint
    assert torch.equal(images, expected)
    raw, _ = module.generate(2, x_T=x_T, use_ema=False)
    assert not torch.allclose(raw, expected, atol=1e-4)  # so the match above is the EMA weights


def test_decode_runs_in_the_precision_of_the_surrounding_autocast(trained):
    module = trained.module
    z = fixed_noise(module, 2)
    full = module.decode_latents(z)
    assert full.dtype == torch.float32 and torch.equal(full, module.first_stage.decode(z).clamp(-1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16-mixed sampling on a GPU does
        half = module.decode_latents(z)
    assert half.dtype == torch.float32
    difference = (half - full).abs().max().item()
    assert 0 < difference < 0.1  # decoded in bf16: rounded (about 2^-8 relative), not a different image


def test_ema_export_alone_reproduces_the_trained_model(trained, tmp_path):
    path = save_ema_export(trained.module, tmp_path / "ldm-ema.safetensors")
    loaded = load_diffusion_model(str(path)).eval()
    x_T = fixed_noise(trained.module, 2)
    expected, _ = trained.module.generate(2, x_T=x_T)
    assert torch.equal(loaded.generate(2, x_T=x_T)[0], expected)
    assert torch.equal(loaded.generate(2, x_T=x_T, use_ema=False)[0], expected)  # only EMA weights exported
    assert float(loaded.first_stage.scale_factor) == float(trained.module.first_stage.scale_factor)


# --------------------------------------------------------------------------- stage=sample
def sample_config(trained, run: str, **options) -> OmegaConf:
    defaults = OmegaConf.load(REPO / "conf/stage/sample.yaml").sample
    merged = OmegaConf.merge(defaults, {"ckpt": str(trained.last), "accelerator": "cpu", "steps": 3}, options)
    return OmegaConf.create({"paths": {"run_dir": str(trained.root / run), "output_root": str(trained.root)},
                             "sample": merged})


def read_png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def count_generated(monkeypatch) -> list[int]:
    counts = []
    real = DiffusionModule.generate

    def spy(self, n, **kwargs):
        counts.append(n)
        return real(self, n, **kwargs)

    monkeypatch.setattr(DiffusionModule, "generate", spy)
    return counts


def test_sample_task_writes_images_and_grid_and_resumes(trained, monkeypatch):
    counts = count_generated(monkeypatch)
    cfg = sample_config(trained, "sample_run", ckpt=None, num_samples=6, batch_size=4, grid_size=4)
    sample(cfg)  # ckpt null: the newest diffusion/**/checkpoints/last.ckpt under paths.output_root
    images = trained.root / "sample_run/images"
    names = sorted(p.name for p in images.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(6)]
    first = {name: read_png(images / name) for name in names}
    assert first["000000.png"].shape == (32, 32) and first["000000.png"].dtype == np.uint8
    grid = read_png(trained.root / "sample_run/grid.png")
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 4 images, 2 per row, 2-pixel borders
    assert counts == [4, 2]

    counts.clear()
    sample(cfg)
    assert counts == []  # everything already on disk
    (images / "000003.png").unlink()
    sample(cfg)
    assert counts == [1]
    assert np.array_equal(read_png(images / "000003.png"), first["000003.png"])  # seed 3 alone = in a batch


def test_sample_task_npz_from_the_ema_export(trained, tmp_path):
    export = save_ema_export(trained.module, tmp_path / "ldm-ema.safetensors")
    sample(sample_config(trained, "npz_run", ckpt=str(export), format="npz", num_samples=3, batch_size=2))
    arrays = np.load(trained.root / "npz_run/images/samples_rank0.npz")
    assert arrays["seeds"].tolist() == [0, 1, 2]
    assert arrays["images"].shape == (3, 32, 32, 1) and arrays["images"].dtype == np.uint8
    grid = read_png(trained.root / "npz_run/grid.png")
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 3 images on a 2 x 2 grid


@pytest.mark.parametrize("sampler, eta", [("dpmpp_2m", None), ("ddim", 0.0)])
def test_an_image_depends_on_its_seed_only(trained, sampler, eta):
    sample(sample_config(trained, f"{sampler}_a", sampler=sampler, eta=eta, seed_start=0, num_samples=8,
                         batch_size=8, grid_size=0))
    sample(sample_config(trained, f"{sampler}_b", sampler=sampler, eta=eta, seed_start=4, num_samples=2,
                         batch_size=2, grid_size=0))
    a, b = trained.root / f"{sampler}_a/images", trained.root / f"{sampler}_b/images"
    assert sorted(p.name for p in b.glob("*.png")) == ["000004.png", "000005.png"]
    assert np.array_equal(read_png(a / "000005.png"), read_png(b / "000005.png"))
    assert np.array_equal(read_png(a / "000004.png"), read_png(b / "000004.png"))
    assert not np.array_equal(read_png(a / "000004.png"), read_png(a / "000005.png"))


# --------------------------------------------------------------------------- class conditioning
CLASSES_ADM = {"class": {"kind": "class", "num_classes": 10, "output": "vector", "drop_rate": 0.1}}


def test_class_conditional_model_trains_and_its_table_is_optimised_and_averaged(tmp_path):
    data = FewDigits(batch_size=4)
    export = make_export(tmp_path / "export/autoencoder.safetensors", data.identity())
    module = DiffusionModule(first_stage=load_first_stage(path=str(export)), unet=TINY_UNET, schedule=NoiseSchedule(),
                             image_size=32, conditioning=CLASSES_ADM, scale_estimation_batches=1,
                             num_log_images=0, lr=2e-3)
    table = module.conditioner.embedders["class"].table
    assert table.weight.shape == (11, 4 * PRESETS["tiny"]["model_channels"])  # ten classes and the null class
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, datamodule=data)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(table.weight) in optimised
    averaged = module.ema.model["conditioner"].embedders["class"].table.weight
    assert module.ema.num_updates == 2 and not torch.equal(averaged, table.weight)  # its own average
    batch = next(iter(data.train_dataloader()))
    labels = batch["label"]
    cond = module.conditioner(module.conditioner.inputs(batch), module.device)  # no dropout
    torch.testing.assert_close(cond["vector"], table.weight[labels])
    table.weight.grad = None
    module.loss(module.unet, module.latents(batch), cond).backward()
    assert table.weight.grad[labels].abs().sum() > 0  # the labels steer the network
    assert table.weight.grad[10].abs().sum() == 0  # the null row only learns from dropped labels


def pixel_module(**kwargs) -> DiffusionModule:
    """Stage 2 on 1x8x8 'images' through the identity first stage: cheap, and latents = inputs."""
    return DiffusionModule(first_stage=identity_first_stage(image_channels=1), unet=TINY_UNET,
                           schedule=NoiseSchedule(), image_size=8, num_log_images=0, **kwargs)


class Recorder(torch.nn.Module):
    """A stand-in network that records what it is given and predicts a fixed function of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def forward(self, x, t, **cond):
        self.calls.append((x.shape[0], {k: v.clone() for k, v in cond.items()}))
        return 0.5 * x + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("output", ["vector", "context"])
def test_label_dropout_replaces_labels_with_the_null_class_at_the_configured_rate(output):
    spec = {"class": {**CLASSES_ADM["class"], "output": output, "drop_rate": 0.2,
                      "dim": None if output == "vector" else 16}}
    module = pixel_module(conditioning=spec)
    conditioner = module.conditioner
    table = conditioner.embedders["class"].table.weight.detach()
    labels = torch.arange(20_000) % 10
    cond = conditioner({"class": labels}, torch.device("cpu"), drop=True,
                       generator=torch.Generator().manual_seed(0))
    rows = cond[output].detach().reshape(20_000, -1)
    dropped = (rows == table[10]).all(1)
    assert abs(dropped.float().mean().item() - 0.2) < 0.015  # 5 standard deviations
    torch.testing.assert_close(rows[~dropped], table[labels[~dropped]])
    per_class = torch.stack([dropped[labels == c].float().mean() for c in range(10)])
    assert (per_class - 0.2).abs().max() < 0.05  # independent of the label
    kept = conditioner({"class": labels}, torch.device("cpu"))[output].detach().reshape(20_000, -1)
    torch.testing.assert_close(kept, table[labels])  # no dropout outside training


@pytest.mark.parametrize("output", ["vector", "context"])
def test_guidance_runs_one_doubled_batch_per_step(output):
    spec = {"class": {**CLASSES_ADM["class"], "output": output, "dim": None if output == "vector" else 16}}
    module = pixel_module(conditioning=spec).eval()
    table = module.ema.model["conditioner"].embedders["class"].table.weight
    seen = []
    module.ema.model["unet"].register_forward_hook(lambda net, args, kwargs, out: seen.append(
        (args[0].shape[0], kwargs[output].reshape(args[0].shape[0], -1))), with_kwargs=True)
    labels = torch.tensor([3, 7])
    images, spec_ = module.generate(2, labels=labels, guidance_scale=3.0, steps=5, sampler="ddim",
                                    generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and spec_.steps == 5
    assert [size for size, _ in seen] == [4] * 5  # [conditional; null] in one call per step
    torch.testing.assert_close(seen[0][1], table[torch.tensor([3, 7, 10, 10])])
    seen.clear()
    module.generate(2, labels=labels, guidance_scale=1.0, steps=5, sampler="ddim")
    assert [size for size, _ in seen] == [2] * 5  # no guidance: the conditional model alone
    torch.testing.assert_close(seen[0][1], table[labels])


# --------------------------------------------------------------------------- the loss
def scaled_linear_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    betas = torch.linspace(math.sqrt(0.0015), math.sqrt(0.0195), 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)[t].view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("loss_type, gamma", [("l2", None), ("l2", 5.0), ("l1", None)])
def test_diffusion_loss_matches_a_hand_computed_case(prediction, loss_type, gamma):
    module = pixel_module(prediction=prediction, loss_type=loss_type, min_snr_gamma=gamma)
    z0 = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # the loss draws t, then the noise, from the generator it is given
    generator = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator, dtype=torch.float64)
    a = scaled_linear_alpha_bar(t)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    output = 0.5 * z_t + 0.01 * t.view(-1, 1, 1, 1)
    target = {"eps": noise, "x0": z0, "v": a.sqrt() * noise - (1 - a).sqrt() * z0}[prediction]
    error = output - target
    per_sample = (error.abs() if loss_type == "l1" else error.pow(2)).mean(dim=(1, 2, 3))
    weight = torch.ones(3, dtype=torch.float64)
    if gamma is not None:
        snr = (a / (1 - a)).flatten()
        weight = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / {
            "eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
    expected = (weight * per_sample).mean()
    loss = module.loss(Recorder(), z0, {}, generator=torch.Generator().manual_seed(7))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_diverging_run_stops_without_nan_weights(tmp_path):
    """lr=1e30: the first update explodes the weights, the next loss is not finite. That step is skipped on the
    device (the fused AdamW's found_inf), reported two batches later, and the saved state is finite."""
    from lightning_ldm.errors import NonFiniteLossError

    torch.manual_seed(0)
    module = DiffusionModule(first_stage=identity_first_stage(image_channels=1), unet=TINY_UNET,
                             schedule=NoiseSchedule(), image_size=32, num_log_images=0, lr=1e30, max_steps=20)
    with pytest.raises(NonFiniteLossError) as error:
        make_trainer(tmp_path, 20).fit(module, datamodule=FewDigits(batch_size=4))
    assert_one_line(error, "diffusion", "for diagnosis", "resume=auto continues from checkpoints/last.ckpt")
    path = Path(str(error.value).split("state saved to ")[1].split(" for diagnosis")[0])
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    weights = [v for k, v in checkpoint["state_dict"].items() if k.startswith(("unet.", "ema.model."))]
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())


def test_decoding_in_chunks_gives_the_same_images(trained, monkeypatch):
    """Samples are decoded DECODE_CHUNK at a time (memory); the images equal one whole-batch decode."""
    import lightning_ldm.diffusion.module as module_file

    module = trained.module
    shape = (module.first_stage.latent_channels, module.latent_size, module.latent_size)
    x_T = torch.randn(5, *shape, generator=torch.Generator().manual_seed(3))
    whole, _ = module.generate(5, x_T=x_T, steps=2)
    monkeypatch.setattr(module_file, "DECODE_CHUNK", 2)
    chunked, _ = module.generate(5, x_T=x_T, steps=2)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("setting,on_gpu,accumulate,mode", [
    (True, True, 1, "reduce-overhead"),
    (True, True, 2, None),  # the graphs' pooled gradients would be overwritten between micro-batches
    (False, True, 1, None),
    (True, False, 1, None),  # CPUs have no CUDA graphs
])
def test_cuda_graphs_replay_the_compiled_step_on_gpus_without_accumulation(tmp_path, monkeypatch, setting, on_gpu,
                                                                          accumulate, mode):
    import lightning_ldm.diffusion.module as diffusion_module
    import lightning_ldm.training.acceleration as acceleration

    for where in (diffusion_module, acceleration):
        monkeypatch.setattr(where, "training_on_gpu", lambda trainer: on_gpu)
    module = pixel_module(compile=True, cuda_graphs=setting)
    modes = []
    monkeypatch.setattr(module.unet, "compile", lambda **options: modes.append(options.get("mode")))
    module.trainer = make_trainer(tmp_path, 1, accumulate_grad_batches=accumulate)
    module.setup("fit")
    assert modes == [mode] and module.cuda_graphs == (mode is not None)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    class StepStarted(Exception):
        pass

    def step_work(batch):
        raise StepStarted

    monkeypatch.setattr(module, "latents", step_work)
    with pytest.raises(StepStarted):
        module.training_step({}, 0)
    assert len(marks) == (mode is not None)  # each step starts a new generation of graph outputs, before its work
