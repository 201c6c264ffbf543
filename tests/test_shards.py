"""Tar shards (data=shards): written from a folder and read back the same, every sample once per epoch across
ranks and workers, read from a remote (in-memory) filesystem, resumed mid-epoch exactly, trained on."""

import json

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ldm.data.base import ImageDataLoader
from lightning_ldm.data.folder import ImageFolderDataModule
from lightning_ldm.data.shards import ShardDataModule, ShardStream, expand_urls
from lightning_ldm.data.write_shards import write_shards
from lightning_ldm.errors import DataError

from conftest import assert_one_line_error, run_cli

COUNT = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 captioned images in two class folders, written as 8 shards of 2."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i in range(COUNT):
        folder = root / "images" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"image {i}\nanother caption of image {i}\n")
    index = write_shards(str(root / "images"), str(root / "out"), shard_size=2, workers=2, progress=False)
    return root, index


def _stream(urls, **options):
    settings = dict(image_size=16, channels=3, train=False, flip=False, seed=0, captioned=True)
    return ShardStream(expand_urls(urls), **{**settings, **options})


def _ids(items) -> list[int]:
    return [int(item["caption"].split()[-1]) for item in items]


def test_shards_round_trip_images_labels_and_captions(shards):
    root, index = shards
    assert index["num_samples"] == COUNT and [s["count"] for s in index["shards"]] == [2] * 8
    assert index["classes"] == ["cats", "dogs"] and index["captioned"]
    folder = ImageFolderDataModule(root=str(root / "images"), image_size=16, val_fraction=0.0, flip=False)
    folder.setup()
    view = folder.train_dataset
    items = list(_stream(str(root / "out")))
    assert len(items) == COUNT
    for i, item in enumerate(items):  # shards keep the source's sorted order
        expected = view[view.indices.index(i)]
        assert torch.equal(item["image"], expected["image"]) and item["label"] == expected["label"]
        assert item["caption"] == view.source.captions(i)[0]  # validation's caption: the first


def _epoch(urls, rank: int, world: int, monkeypatch, workers: int = 2, epochs: int = 1) -> list[list[int]]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    stream = _stream(urls, train=True, flip=True, shuffle_buffer=3)
    loader = ImageDataLoader(stream, batch_size=1, num_workers=workers, persistent_workers=True)
    return [_ids([{"caption": c} for batch in loader for c in batch["caption"]]) for _ in range(epochs)]


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(shards, monkeypatch):
    urls = str(shards[0] / "out")
    first = [_epoch(urls, rank, 2, monkeypatch, epochs=2) for rank in (0, 1)]
    for epoch in (0, 1):
        seen = first[0][epoch] + first[1][epoch]
        assert sorted(seen) == list(range(COUNT))  # each exactly once
        assert set(first[0][epoch]).isdisjoint(first[1][epoch])
    assert first[0][0] != first[0][1]  # a new order each epoch


def test_shards_are_read_from_a_remote_filesystem(shards):
    root = shards[0]
    memory = fsspec.filesystem("memory")
    for path in sorted((root / "out").glob("*.tar")):
        memory.pipe(f"/remote/{path.name}", path.read_bytes())
    local, remote = list(_stream(str(root / "out"))), list(_stream("memory://remote"))
    assert _ids(remote) == _ids(local) and sorted(_ids(local)) == list(range(COUNT))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(local, remote))
    brace = list(_stream("memory://remote/shard-{000002..000003}.tar"))
    assert _ids(brace) == _ids(local)[4:8]  # the third and fourth shards


def test_a_resumed_loader_continues_with_the_next_items(shards):
    urls = str(shards[0] / "out")

    def loader():
        return ImageDataLoader(_stream(urls, train=True, flip=True, shuffle_buffer=3), batch_size=2, num_workers=2)

    uninterrupted = [batch for batch in loader()]
    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(uninterrupted)
    for got, want in zip(head + tail, uninterrupted):
        assert got["caption"] == want["caption"] and torch.equal(got["image"], want["image"])


def test_bad_shard_urls_stop_in_one_line(tmp_path, shards):
    with pytest.raises(DataError, match="neither a .tar shard nor a folder"):
        expand_urls(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar shards"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="cannot open shard"):
        list(_stream([str(tmp_path / "missing.tar")]))


def test_write_shards_command_and_a_stage_1_run_on_shards(shards, tmp_path):
    root = shards[0]
    result = run_cli(str(root / "images"), str(tmp_path / "cli"), "--shard-size", "5", "--workers", "2",
                     cwd=tmp_path, module="lightning_ldm.data.write_shards")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "cli" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 1]
    assert_one_line_error(run_cli(str(tmp_path / "none"), str(tmp_path / "x"), cwd=tmp_path,
                                  module="lightning_ldm.data.write_shards"), "does not exist")
    result = run_cli("stage=autoencoder", "data=shards", f"data.urls={root / 'out'}", f"data.val_urls={root / 'out'}",
                     "data.image_size=16", "data.batch_size=4", "data.num_workers=0", "debug=fast_dev_run",
                     "trainer=cpu", "logger=none", "autoencoder.ch=32", "autoencoder.num_res_blocks=1",
                     "loss.perceptual_weight=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_stage_2_trains_on_shards_streamed_and_from_their_latent_cache(shards, tmp_path):
    root = shards[0]
    common = ["stage=diffusion", "data=shards", f"data.urls={root / 'out'}", f"data.val_urls={root / 'out'}",
              "data.image_size=16", "data.batch_size=4", "data.num_workers=0", "data.captioned=true",
              "autoencoder=identity", "conditioning=text", "module.conditioning.caption.dim=32",
              "module.conditioning.caption.depth=1", "module.conditioning.caption.heads=2",
              "module.conditioning.caption.dim_head=16", "module.scale_estimation_batches=1",
              "module.sampling.steps=2", "module.num_log_images=2", "debug=fast_dev_run", "trainer=cpu", "logger=none"]
    result = run_cli(*common, "module.cache_latents=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(tmp_path.rglob("chunk-*.pt"))
    result = run_cli(*common, cwd=tmp_path)  # cached by default
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.rglob("latent_cache/latents-*/chunk-*.pt"))) == 8  # one chunk per shard


def test_the_data_module_serves_batches(shards):
    data = ShardDataModule(urls=str(shards[0] / "out"), image_size=16, batch_size=4, num_workers=0, captioned=True)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["caption"]) == 4
    assert sorted(set(data.training_captions()))[:2] == ["another caption of image 0", "another caption of image 1"]
    assert data.identity()["urls"] == expand_urls(str(shards[0] / "out"))


def test_reference_statistics_from_shards_equal_those_of_the_same_images_in_a_folder(shards, tmp_path):
    from fid_helpers import write_torchscript_extractor
    from lightning_ldm.metrics import FeatureExtractorSpec
    from lightning_ldm.metrics.features import build_feature_extractor
    from lightning_ldm.metrics.reference import load_or_compute_reference, split_view

    from lightning_ldm.errors import ConfigError

    root = shards[0]
    spec = FeatureExtractorSpec(kind="checkpoint", name="pixels", path=str(write_torchscript_extractor(tmp_path / "x.pt")))
    extractor = build_feature_extractor(spec)
    streamed = ShardDataModule(urls=str(root / "out"), val_urls=str(root / "out"), image_size=16, num_workers=0)
    streamed.setup()
    folder = ImageFolderDataModule(root=str(root / "images"), image_size=16, val_fraction=0.0, flip=True)
    folder.setup()
    references = [load_or_compute_reference(split_view(data, split, "key", whole_streams=True), extractor=extractor,
                                            identity=data.identity(), cache_dir=tmp_path / "ref", split=split,
                                            batch_size=5, num_workers=workers)
                  for data, split, workers in ((streamed, "val", 2), (streamed, "train", 0), (folder, "train", 0))]
    for reference in references[:2]:  # two workers or none, the validation stream or the (unshuffled) training one
        assert reference.statistics.n == COUNT
        torch.testing.assert_close(reference.statistics.mu, references[2].statistics.mu, rtol=0, atol=1e-6)
        torch.testing.assert_close(reference.statistics.sigma, references[2].statistics.sigma, rtol=0, atol=1e-6)
    again = load_or_compute_reference(split_view(streamed, "val", "key", whole_streams=True), extractor=extractor,
                                      identity=streamed.identity(), cache_dir=tmp_path / "ref", split="val")
    assert again.reused
    with pytest.raises(ConfigError, match="streamed shards give their whole split"):
        load_or_compute_reference(split_view(streamed, "val", "key", whole_streams=True), extractor=extractor,
                                  identity=streamed.identity(), cache_dir=tmp_path / "ref", split="val", count=4)
    with pytest.raises(ConfigError, match="picks images by index"):
        split_view(streamed, "val", "evaluate.split")
