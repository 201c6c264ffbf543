"""The latent scale factor s = 1/std (paper Sec. 4.3.2): estimated over many batches and all ranks alike,
kept in the checkpoint, never recomputed on resume; a configured value wins; VQ latents stay unscaled."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ldm.latent.scale import estimate_scale_factor

# Heavier imports (Lightning, models, data) live inside the tests: spawned workers import this module.


def rank_batches(rank: int) -> list[dict]:
    """Batches that differ per rank in count, size and distribution, so a per-rank std would be wrong."""
    generator = torch.Generator().manual_seed(100 + rank)
    loc, scale, count = (0.0, 1.0, 3) if rank == 0 else (2.0, 3.0, 2)
    return [{"z": loc + scale * torch.randn(4 + rank, 2, 3, 3, generator=generator)} for _ in range(count)]


def population_scale(tensors: list[torch.Tensor]) -> float:
    values = torch.cat([t.flatten().double() for t in tensors])
    return float(1.0 / values.std(correction=0))


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        value = estimate_scale_factor(rank_batches(rank), lambda batch: batch["z"], 10, torch.device("cpu"))
        torch.save(value, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_estimate_is_one_over_the_std_of_every_latent_seen():
    batches = rank_batches(0) + rank_batches(1)
    value = estimate_scale_factor(batches, lambda batch: batch["z"], 10, torch.device("cpu"))
    assert value == pytest.approx(population_scale([b["z"] for b in batches]), rel=1e-10)


def test_estimate_reads_only_the_requested_number_of_batches():
    batches = rank_batches(1) + rank_batches(0)
    value = estimate_scale_factor(iter(batches), lambda batch: batch["z"], 2, torch.device("cpu"))
    assert value == pytest.approx(population_scale([b["z"] for b in batches[:2]]), rel=1e-10)


def test_constant_latents_are_refused():
    with pytest.raises(RuntimeError, match="variance"):
        estimate_scale_factor([{"z": torch.ones(4, 4)}], lambda batch: batch["z"], 1, torch.device("cpu"))


def test_two_ranks_with_different_batches_agree_on_the_std_of_their_union(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    values = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    union = population_scale([b["z"] for r in range(2) for b in rank_batches(r)])
    assert values[0] == values[1]
    assert values[0] == pytest.approx(union, rel=1e-10)
    assert abs(union - population_scale([b["z"] for b in rank_batches(0)])) > 0.1  # the ranks really differ


# --------------------------------------------------------------------------- inside a stage-2 run
def few_digits(**kwargs):
    from few_digits import FewDigits

    return FewDigits(batch_size=4, **kwargs)


def make_export(path, data, preset: str = "kl-f2-small"):
    from lightning_ldm.autoencoder.export import save_autoencoder_export
    from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder

    torch.manual_seed(0)
    return save_autoencoder_export(Autoencoder(**{**SMALL_PRESETS[preset], "in_channels": 1}), path,
                                   data=data.identity())


def make_module(export, scale_factor=None, sample_posterior: bool = True):
    from lightning_ldm.diffusion.module import DiffusionModule
    from lightning_ldm.diffusion.schedules import NoiseSchedule
    from lightning_ldm.latent.first_stage import load_first_stage
    from lightning_ldm.unet.model import PRESETS, UNet

    first_stage = load_first_stage(path=str(export), scale_factor=scale_factor, sample_posterior=sample_posterior)
    return DiffusionModule(first_stage=first_stage, unet=functools.partial(UNet, **PRESETS["tiny"]),
                           schedule=NoiseSchedule(), image_size=32, scale_estimation_batches=2, num_log_images=0)


def make_trainer(root, max_steps: int, **kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), **kwargs)


def forbid_estimation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("estimate_scale_factor must not be called")

    monkeypatch.setattr("lightning_ldm.latent.first_stage.estimate_scale_factor", refuse)


def test_scale_factor_is_estimated_once_stored_and_not_recomputed_on_resume(tmp_path, monkeypatch):
    import lightning as L

    import lightning_ldm.latent.first_stage as module_file

    data = few_digits()
    export = make_export(tmp_path / "export/autoencoder.safetensors", data)
    calls = []
    real = module_file.estimate_scale_factor
    monkeypatch.setattr(module_file, "estimate_scale_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = make_module(export)
    assert not module.first_stage.scale_is_set
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    make_trainer(tmp_path, 2, callbacks=[checkpoints]).fit(module, datamodule=data)
    assert calls == [1]
    scale = float(module.first_stage.scale_factor)
    assert 0 < scale < float("inf")
    saved = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert float(saved["state_dict"]["first_stage.scale_factor"]) == scale

    forbid_estimation(monkeypatch)
    other_data = few_digits(seed=7, flip=True)  # other images: a fresh estimate would differ
    resumed = make_module(export)
    trainer = make_trainer(tmp_path, 3, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=other_data, ckpt_path=str(tmp_path / "checkpoints/last.ckpt"))
    assert trainer.global_step == 3  # it really trained on
    assert float(resumed.first_stage.scale_factor) == scale


def test_a_configured_scale_factor_is_used_as_is(tmp_path, monkeypatch):
    data = few_digits(val_fraction=0.0)  # no validation images either: the first-stage check is skipped
    export = make_export(tmp_path / "export/autoencoder.safetensors", data)
    forbid_estimation(monkeypatch)
    module = make_module(export, scale_factor=0.37, sample_posterior=False)
    make_trainer(tmp_path, 1, enable_checkpointing=False).fit(module, datamodule=data)
    assert float(module.first_stage.scale_factor) == pytest.approx(0.37)
    images = next(iter(data.train_dataloader()))["image"]
    mean, _ = module.first_stage.encode_distribution(images)
    torch.testing.assert_close(module.first_stage.encode(images), 0.37 * mean)
    torch.testing.assert_close(module.first_stage.decode(0.37 * mean), module.first_stage.autoencoder.decode(mean))


def test_vq_first_stage_defaults_to_scale_one(tmp_path):
    from lightning_ldm.latent.first_stage import identity_first_stage, load_first_stage

    data = few_digits()
    export = make_export(tmp_path / "export/autoencoder.safetensors", data, preset="vq-f4-small")
    first_stage = load_first_stage(path=str(export))
    assert first_stage.regularizer == "vq"
    assert first_stage.scale_is_set and float(first_stage.scale_factor) == 1.0
    assert float(load_first_stage(path=str(export), scale_factor=0.5).scale_factor) == 0.5
    kl = load_first_stage(path=str(make_export(tmp_path / "kl/autoencoder.safetensors", data)))
    assert not kl.scale_is_set  # KL latents are estimated at the start of training
    assert float(identity_first_stage(image_channels=1).scale_factor) == 1.0
