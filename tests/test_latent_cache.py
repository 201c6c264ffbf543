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
    dataset, path = load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"))
    assert path.is_dir() and path.parent == tmp_path / "cache"
    assert [p.name for p in path.iterdir()] == ["chunk-000000.pt"]  # 90 images: one chunk of CHUNK_ITEMS
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
    chunk = path / "chunk-000000.pt"
    mtime = chunk.stat().st_mtime_ns
    first_stage.autoencoder.encode = None  # encoding again would fail
    again, again_path = load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"))
    assert again_path == path and chunk.stat().st_mtime_ns == mtime
    assert torch.equal(again.column("mean"), dataset.column("mean"))
    # Mapped, not read into private memory: the file is among the process's mappings.
    assert str(chunk.resolve()) in open("/proc/self/maps").read()


def test_the_cache_is_encoded_through_the_datas_loader_workers_in_order(tmp_path, monkeypatch):
    import lightning_ldm.latent.cache as cache

    used = []
    encode = cache.encode_chunks
    monkeypatch.setattr(cache, "encode_chunks", lambda *args, **kwargs: used.append(kwargs["num_workers"]) or
                        encode(*args, **kwargs))
    caches = []
    for workers in (0, 2):
        data = FewDigits(every=50, batch_size=8, num_workers=workers)
        data.setup()
        first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
        dataset, _ = load_or_build_cache(first_stage, data, tmp_path / f"cache{workers}", torch.device("cpu"))
        caches.append(dataset)
    assert used == [0, 2]
    assert torch.equal(caches[0].column("mean"), caches[1].column("mean"))
    assert torch.equal(caches[0].column("labels"), caches[1].column("labels"))


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
        load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"))
    message = str(caught.value)
    assert message.startswith("cannot decode image ") and "broken.jpg" in message and "\n" not in message


def test_with_flips_the_cache_holds_the_encoded_mirror_images(tmp_path):
    data = FewDigits(every=50, batch_size=8, flip=True)
    data.setup()
    first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
    dataset, _ = load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"))
    assert data.train_dataset.flip  # the datamodule's own view still flips afterwards
    data.train_dataset.flip = False
    images = torch.stack([data.train_dataset[i]["image"] for i in range(len(data.train_dataset))])
    data.train_dataset.flip = True
    mean, std = first_stage.encode_distribution(images)
    mean_flipped, std_flipped = first_stage.encode_distribution(images.flip(-1))
    assert not torch.allclose(mean, mean_flipped, **HALF)  # digits are not mirror-symmetric
    torch.testing.assert_close(dataset.column("mean").float(), mean, **HALF)  # never a randomly flipped image
    torch.testing.assert_close(dataset.column("std").float(), std, **HALF)
    torch.testing.assert_close(dataset.column("mean_flipped").float(), mean_flipped, **HALF)
    torch.testing.assert_close(dataset.column("std_flipped").float(), std_flipped, **HALF)
    # items come in both orientations, about half each
    torch.manual_seed(0)
    flipped = [torch.equal(dataset[5]["latent_mean"], dataset.column("mean_flipped")[5].float()) for _ in range(200)]
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
    assert len(list((tmp_path / "cache").glob("latents-*"))) == 1
    assert isinstance(cached.latents(), LatentDataset)
    assert not isinstance(data.train_dataset, LatentDataset)  # the image data is not written into
    assert batches == [["label", "latent_mean", "latent_std"]] * 2  # no image reached a training step
    assert all(torch.isfinite(torch.tensor(losses)))
    assert module.first_stage.scale_is_set
    assert any(not torch.equal(a, b) for a, b in zip(before, module.unet.parameters()))
    # the scale was estimated from the cached latents: 1/std of posterior samples drawn from the cache
    cache = cached.latents()
    latents = cache.column("mean").float() + cache.column("std").float() * torch.randn(cache.column("mean").shape)
    assert float(module.first_stage.scale_factor) == pytest.approx(float(1 / latents.std()), rel=0.05)


def test_a_cache_of_another_first_stage_is_not_read(tmp_path):
    data = FewDigits(every=50, batch_size=8)
    data.setup()
    cache_dir = tmp_path / "cache"
    first = load_first_stage(path=str(make_export(tmp_path / "a/autoencoder.safetensors", data)))
    _, first_path = load_or_build_cache(first, data, cache_dir, torch.device("cpu"))
    second = load_first_stage(path=str(make_export(tmp_path / "b/autoencoder.safetensors", data, seed=1)))
    dataset, second_path = load_or_build_cache(second, data, cache_dir, torch.device("cpu"))
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
    caches = sorted((tmp_path / "cache").glob("latents-*"))
    assert len(caches) == 1

    make_export(export, data, seed=5)  # a newer stage 1 written over the export the run started from
    resumed = module()
    trainer(2, enable_checkpointing=False).fit(resumed, datamodule=CachedLatents(FewDigits(every=50, batch_size=4), str(tmp_path / "cache")),
                                               ckpt_path=str(tmp_path / "checkpoints/last.ckpt"))
    for key, value in resumed.first_stage.state_dict().items():
        assert torch.equal(value, trained_weights[key] if key != "scale_factor" else first.first_stage.scale_factor)
    assert sorted((tmp_path / "cache").glob("latents-*")) == caches  # the latents of the weights in use


def _chunks(directory) -> dict[str, dict]:
    return {path.name: torch.load(path, weights_only=True) for path in sorted(directory.glob("chunk-*.pt"))}


def _assert_same_chunks(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for name in first:
        assert first[name].keys() == second[name].keys()
        for key, value in first[name].items():
            assert torch.equal(value, second[name][key]) if torch.is_tensor(value) else value == second[name][key]


def _two_rank_worker(rank: int, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    try:
        data = FewDigits(every=50, batch_size=8, flip=True)
        data.setup()
        first_stage = load_first_stage(path=f"{root}/export/autoencoder.safetensors")
        dataset, path = load_or_build_cache(first_stage, data, f"{root}/two", torch.device("cpu"), rank=rank,
                                            world_size=2, barrier=dist.barrier, chunk_items=16)
        # Every rank reads every chunk, its own and the other's.
        torch.save({"length": len(dataset), "mean": dataset.column("mean")}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_cache_written_by_two_ranks_equals_the_cache_written_by_one(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    import lightning_ldm.latent.cache as cache

    data = FewDigits(every=50, batch_size=8, flip=True)
    data.setup()
    make_export(tmp_path / "export/autoencoder.safetensors", data)
    first_stage = load_first_stage(path=str(tmp_path / "export/autoencoder.safetensors"))
    encoded = []  # which chunks each call encoded
    encode = cache.encode_chunks
    monkeypatch.setattr(cache, "encode_chunks", lambda *args, **kwargs: encoded.append(
        (kwargs["rank"], sum(i % kwargs["world_size"] == kwargs["rank"] for i in range(len(args[1]))))) or
        encode(*args, **kwargs))
    one, one_path = load_or_build_cache(first_stage, data, tmp_path / "one", torch.device("cpu"), chunk_items=16)
    assert len(list(one_path.glob("chunk-*.pt"))) == 6 and encoded == [(0, 6)]  # 90 images in chunks of 16

    mp.spawn(_two_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    two_path = next((tmp_path / "two").glob("latents-*"))
    assert two_path.name == one_path.name  # the key does not depend on the number of ranks
    _assert_same_chunks(_chunks(one_path), _chunks(two_path))
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert seen["length"] == 90 and torch.equal(seen["mean"], one.column("mean"))


def test_an_interrupted_build_resumes_at_the_first_missing_chunk(tmp_path):
    data = FewDigits(every=50, batch_size=8)
    data.setup()
    first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
    whole, whole_path = load_or_build_cache(first_stage, data, tmp_path / "whole", torch.device("cpu"), chunk_items=16)

    encode, calls = first_stage.encode_distribution, []

    def interrupted(images):
        calls.append(len(images))
        if len(calls) == 4:  # chunks of 16 in batches of 64: calls 1-3 finish chunks 0-2, call 4 dies
            raise KeyboardInterrupt
        return encode(images)

    first_stage.encode_distribution = interrupted
    with pytest.raises(KeyboardInterrupt):
        load_or_build_cache(first_stage, data, tmp_path / "cut", torch.device("cpu"), chunk_items=16)
    cut_path = next((tmp_path / "cut").glob("latents-*"))
    assert sorted(p.name for p in cut_path.iterdir() if not p.name.startswith(".")) == \
        ["chunk-000000.pt", "chunk-000001.pt", "chunk-000002.pt"]  # whole chunks only, nothing half-written
    kept = {p.name: p.stat().st_mtime_ns for p in cut_path.glob("chunk-*.pt")}
    calls.clear()
    resumed, _ = load_or_build_cache(first_stage, data, tmp_path / "cut", torch.device("cpu"), chunk_items=16)
    assert calls == [16, 16, 10]  # only the three missing chunks were encoded
    assert all(cut_path.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    _assert_same_chunks(_chunks(whole_path), _chunks(cut_path))
    assert len(resumed) == len(whole) == 90


def test_shard_backed_data_caches_one_chunk_per_shard_with_its_captions(tmp_path):
    import numpy as np
    from PIL import Image

    from lightning_ldm.data.shards import ShardDataModule
    from lightning_ldm.data.write_shards import write_shards

    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"digit {i} on the left\nanother caption {i}\n")
    write_shards(str(tmp_path), str(tmp_path / "shards"), shard_size=4, workers=1, progress=False)
    data = ShardDataModule(urls=str(tmp_path / "shards"), image_size=16, channels=1, batch_size=2, num_workers=2,
                           captioned=True, flip=True)
    data.setup()
    first_stage = load_first_stage(path=str(make_export(tmp_path / "export/autoencoder.safetensors", data)))
    dataset, path = load_or_build_cache(first_stage, data, tmp_path / "cache", torch.device("cpu"))
    assert sorted(p.name for p in path.glob("chunk-*.pt")) == [f"chunk-00000{i}.pt" for i in range(3)]
    assert len(dataset) == 10 and dataset.chunk(2)["labels"].shape == (2,)  # shards of 4, 4 and 2
    assert dataset.chunk(0)["captions"][1] == ["digit 1 on the left", "another caption 1"]
    stream = data.train_dataset.__class__(data.train_urls, image_size=16, channels=1, train=False, flip=False,
                                          seed=0, captioned=True)
    images = torch.stack([item["image"] for item in stream])
    mean, _ = first_stage.encode_distribution(images)
    torch.testing.assert_close(dataset.column("mean").float(), mean, **HALF)
    mean_flipped, _ = first_stage.encode_distribution(images.flip(-1))
    torch.testing.assert_close(dataset.column("mean_flipped").float(), mean_flipped, **HALF)
    # A mirrored latent comes with its mirrored caption, as the image stream pairs them.
    torch.manual_seed(0)
    for _ in range(20):
        item = dataset[1]
        mirrored = torch.equal(item["latent_mean"], dataset.chunk(0)["mean_flipped"][1].float())
        assert item["caption"] in (["digit 1 on the right", "another caption 1"] if mirrored else
                                   ["digit 1 on the left", "another caption 1"])
    batch = next(iter(data.loader(dataset, train=True)))
    assert batch["latent_mean"].shape == (2, 4, 8, 8) and len(batch["caption"]) == 2
