"""Cached latents: keyed by the first stage and the data identity, right contents, flips, and training from them."""

import functools
import shutil

import lightning as L
import pytest
import torch

from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.latent.cache import CachedLatents, LatentDataset, cache_key, first_stage_identity, load_or_build_cache
from lightning_ldm.latent.first_stage import load_first_stage
from lightning_ldm.unet.model import PRESETS, UNet
from few_digits import FewDigits

HALF = dict(rtol=2e-3, atol=1e-4)  # the cache stores float16


def make_export(path, data, preset: str = "kl-f2-small", seed: int = 0):
    torch.manual_seed(seed)
    model = Autoencoder(**{**SMALL_PRESETS[preset], "in_channels": 1})
    return save_autoencoder_export(model, path, data=data.identity())


def key(export, data) -> str:
    return cache_key(first_stage_identity(load_first_stage(path=str(export))), data.identity())


def no_barrier() -> None:
    pass


def test_cache_key_follows_the_first_stage_and_the_data(tmp_path):
    data = DigitsDataModule()
    export = make_export(tmp_path / "a/export/autoencoder.safetensors", data)
    reference = key(export, data)
    # stable: the same export loaded again, an equal datamodule built again
    assert key(export, DigitsDataModule()) == reference
    # the first stage: other weights (same architecture), another architecture, the export file replaced
    other_weights = make_export(tmp_path / "b/export/autoencoder.safetensors", data, seed=1)
    assert key(other_weights, data) != reference
    other_config = make_export(tmp_path / "c/export/autoencoder.safetensors", data, preset="kl-f4-small")
    assert key(other_config, data) != reference
    make_export(export, data, seed=2)  # retrained in place: same path, new weights
    assert key(export, data) != reference
    # the data identity and its preprocessing
    assert key(export, DigitsDataModule(image_size=16)) != key(export, data)
    assert key(export, DigitsDataModule(val_fraction=0.2)) != key(export, data)
    assert key(export, DigitsDataModule(flip=True)) != key(export, data)
    assert key(export, DigitsDataModule(batch_size=8)) == key(export, data)  # batching changes no latent


def test_cache_contents_match_encoding_the_training_images(tmp_path):
    data = FewDigits(every=50, batch_size=8)
    data.setup()
    first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
    dataset, path = load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"),
                                        is_global_zero=True, barrier=no_barrier)
    assert path.is_file() and path.parent == tmp_path / "cache"
    assert isinstance(dataset, LatentDataset) and len(dataset) == len(data.train_dataset) == 90
    item = dataset[3]
    assert item["latent_mean"].shape == item["latent_std"].shape == (4, 16, 16)
    assert item["latent_mean"].dtype == torch.float32
    assert (item["latent_std"] > 0).all()
    images = torch.stack([data.train_dataset[i]["image"] for i in (3, 40)])
    mean, std = first_stage.encode_distribution(images)
    torch.testing.assert_close(torch.stack([dataset[i]["latent_mean"] for i in (3, 40)]), mean, **HALF)
    torch.testing.assert_close(torch.stack([dataset[i]["latent_std"] for i in (3, 40)]), std, **HALF)
    assert [int(dataset[i]["label"]) for i in range(len(dataset))] == \
        [data.train_dataset[i]["label"] for i in range(len(dataset))]
    # a second call reuses the file instead of encoding again
    mtime = path.stat().st_mtime_ns
    first_stage.autoencoder.encode = None  # encoding again would fail
    again, again_path = load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"),
                                            is_global_zero=True, barrier=no_barrier)
    assert again_path == path and path.stat().st_mtime_ns == mtime
    assert torch.equal(again.mean, dataset.mean)
    # Mapped, not read into private memory: the file is among the process's mappings.
    assert str(path.resolve()) in open("/proc/self/maps").read()


def test_the_cache_is_encoded_through_the_datas_loader_workers_in_order(tmp_path, monkeypatch):
    import lightning_ldm.latent.cache as cache

    used = []
    encode = cache.encode_dataset
    monkeypatch.setattr(cache, "encode_dataset", lambda *args, **kwargs: used.append(kwargs["num_workers"]) or
                        encode(*args, **kwargs))
    caches = []
    for workers in (0, 2):
        data = FewDigits(every=50, batch_size=8, num_workers=workers)
        data.setup()
        first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
        dataset, _ = load_or_build_cache(first_stage, data, tmp_path / f"cache{workers}", torch.device("cpu"),
                                         is_global_zero=True, barrier=no_barrier)
        caches.append(dataset)
    assert used == [0, 2]
    assert torch.equal(caches[0].mean, caches[1].mean) and torch.equal(caches[0].labels, caches[1].labels)


def test_an_image_that_fails_to_decode_in_a_worker_is_one_line_while_caching(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from lightning_ldm.data.folder import ImageFolderDataModule
    from lightning_ldm.errors import DataError

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(tmp_path / f"{i}.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(buffer, "JPEG")
    (tmp_path / "broken.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # the header passes
    data = ImageFolderDataModule(root=str(tmp_path), use_labels=False, image_size=16, channels=1, batch_size=4,
                                 val_fraction=0.0, num_workers=2)
    data.setup()
    first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
    with pytest.raises(DataError) as caught:
        load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"), is_global_zero=True,
                            barrier=no_barrier)
    message = str(caught.value)
    assert message.startswith("cannot decode image ") and "broken.jpg" in message and "\n" not in message


def test_with_flips_the_cache_holds_the_encoded_mirror_images(tmp_path):
    data = FewDigits(every=50, batch_size=8, flip=True)
    data.setup()
    first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
    dataset, _ = load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"),
                                     is_global_zero=True, barrier=no_barrier)
    assert data.train_dataset.flip  # the datamodule's own view still flips afterwards
    data.train_dataset.flip = False
    images = torch.stack([data.train_dataset[i]["image"] for i in range(len(data.train_dataset))])
    data.train_dataset.flip = True
    mean, std = first_stage.encode_distribution(images)
    mean_flipped, std_flipped = first_stage.encode_distribution(images.flip(-1))
    assert not torch.allclose(mean, mean_flipped, **HALF)  # digits are not mirror-symmetric
    torch.testing.assert_close(dataset.mean.float(), mean, **HALF)  # never a randomly flipped image
    torch.testing.assert_close(dataset.std.float(), std, **HALF)
    torch.testing.assert_close(dataset.mean_flipped.float(), mean_flipped, **HALF)
    torch.testing.assert_close(dataset.std_flipped.float(), std_flipped, **HALF)
    # items come in both orientations, about half each
    torch.manual_seed(0)
    flipped = [torch.equal(dataset[5]["latent_mean"], dataset.mean_flipped[5].float()) for _ in range(200)]
    assert 70 < sum(flipped) < 130


def test_training_from_the_cache(tmp_path, monkeypatch):
    data = FewDigits(every=50, batch_size=4)
    export = make_export(tmp_path / "export/autoencoder.safetensors", data)
    module = DiffusionModule(first_stage=load_first_stage(path=str(export)),
                             unet=functools.partial(UNet, **PRESETS["tiny"]), schedule=NoiseSchedule(),
                             image_size=32, scale_estimation_batches=2, num_log_images=0, cache_latents=True,
                             cache_dir=str(tmp_path / "cache"), lr=1e-3)
    batches, losses = [], []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            batches.append(sorted(batch))
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Spy()], default_root_dir=str(tmp_path / "run"))
    before = [p.clone() for p in module.unet.parameters()]
    cached = CachedLatents(data, str(tmp_path / "cache"))
    trainer.fit(module, datamodule=cached)
    assert len(list((tmp_path / "cache").glob("latents-*.pt"))) == 1
    assert isinstance(cached.latents(), LatentDataset)
    assert not isinstance(data.train_dataset, LatentDataset)  # the image data is not written into
    assert batches == [["label", "latent_mean", "latent_std"]] * 2  # no image reached a training step
    assert all(torch.isfinite(torch.tensor(losses)))
    assert module.first_stage.scale_is_set
    assert any(not torch.equal(a, b) for a, b in zip(before, module.unet.parameters()))
    # the scale was estimated from the cached latents: 1/std of posterior samples drawn from the cache
    cache = torch.load(next((tmp_path / "cache").glob("latents-*.pt")), weights_only=True)
    latents = cache["mean"].float() + cache["std"].float() * torch.randn(cache["mean"].shape)
    assert float(module.first_stage.scale_factor) == pytest.approx(float(1 / latents.std()), rel=0.05)


def test_a_cache_of_another_first_stage_is_not_read(tmp_path):
    data = FewDigits(every=50, batch_size=8)
    data.setup()
    cache_dir = tmp_path / "cache"
    first = load_first_stage(path=str(make_export(tmp_path / "a/autoencoder.safetensors", data)))
    _, first_path = load_or_build_cache(first, data, cache_dir, torch.device("cpu"), is_global_zero=True,
                                        barrier=no_barrier)
    second = load_first_stage(path=str(make_export(tmp_path / "b/autoencoder.safetensors", data, seed=1)))
    dataset, second_path = load_or_build_cache(second, data, cache_dir, torch.device("cpu"), is_global_zero=True,
                                               barrier=no_barrier)
    assert second_path != first_path
    image = data.train_dataset[0]["image"][None]
    torch.testing.assert_close(dataset[0]["latent_mean"][None], second.encode_distribution(image)[0], **HALF)
    shutil.rmtree(cache_dir)


def test_a_resumed_run_caches_the_checkpoints_first_stage_not_a_replaced_export(tmp_path):
    data = FewDigits(every=50, batch_size=4)
    export = make_export(tmp_path / "export/autoencoder.safetensors", data)

    def module():
        return DiffusionModule(first_stage=load_first_stage(path=str(export)),
                               unet=functools.partial(UNet, **PRESETS["tiny"]), schedule=NoiseSchedule(),
                               image_size=32, scale_estimation_batches=1, num_log_images=0, cache_latents=True,
                               cache_dir=str(tmp_path / "cache"))

    def trainer(max_steps, **kwargs):
        return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         **kwargs)

    first = module()
    trained_weights = {k: v.clone() for k, v in first.first_stage.state_dict().items()}
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer(1, callbacks=[checkpoints]).fit(first, datamodule=CachedLatents(data, str(tmp_path / "cache")))
    caches = sorted((tmp_path / "cache").glob("latents-*.pt"))
    assert len(caches) == 1

    make_export(export, data, seed=5)  # a newer stage 1 written over the export the run started from
    resumed = module()
    trainer(2, enable_checkpointing=False).fit(resumed, datamodule=CachedLatents(FewDigits(every=50, batch_size=4), str(tmp_path / "cache")),
                                               ckpt_path=str(tmp_path / "checkpoints/last.ckpt"))
    for key, value in resumed.first_stage.state_dict().items():
        assert torch.equal(value, trained_weights[key] if key != "scale_factor" else first.first_stage.scale_factor)
    assert sorted((tmp_path / "cache").glob("latents-*.pt")) == caches  # the latents of the weights in use
