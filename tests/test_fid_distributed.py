"""FID split across processes (gloo, two CPU processes started with torch.multiprocessing.spawn): each rank
extracts its block of reference images and samples its block of seeds, and the gathered features, statistics and
distances equal those of a single process, for counts that do not divide evenly; the FID callback under
Lightning's DDP logs the single-process value on every rank."""

import os
import socket
from pathlib import Path

import lightning as L

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fid_helpers import StubDiffusion, smooth_images, write_folder, write_torchscript_extractor
from lightning_ldm.data.folder import ImageFolderDataModule
from lightning_ldm.metrics import FeatureExtractorSpec, FIDCallback, build_feature_extractor
from lightning_ldm.distributed import gather_rows, shard
from lightning_ldm.metrics.reference import load_or_compute_reference, unflipped
from lightning_ldm.metrics.sampling import SamplingSettings, generated_features
from lightning_ldm.metrics.scores import distribution_metrics

NUM_REFERENCE, NUM_SAMPLES = 13, 11  # neither divides by two: the ranks' blocks differ in size


def measure(root: Path, cache: Path) -> dict:
    """What one process (of however many) computes; the full results on rank 0, None elsewhere."""
    extractor = build_feature_extractor(FeatureExtractorSpec(kind="checkpoint", name="pixels",
                                                             path=str(root / "pixels.pt")))
    data = ImageFolderDataModule(root=str(root / "real"), image_size=32, channels=3, batch_size=4, num_workers=0,
                                 val_fraction=0.0, flip=True)
    data.setup()
    reference = load_or_compute_reference(unflipped(data.train_dataset), identity=data.identity(),
                                          extractor=extractor, cache_dir=cache, batch_size=4, keep_features=True,
                                          log=lambda message: None)
    # FD alone: statistics by streaming moments, each rank its block, never a feature gathered.
    streamed = load_or_compute_reference(unflipped(data.train_dataset), identity=data.identity(), extractor=extractor,
                                         cache_dir=cache / "streamed", batch_size=4, log=lambda message: None)
    images = torch.load(root / "samples.pt")
    generated = generated_features(StubDiffusion(images), extractor, num_samples=NUM_SAMPLES, seed_start=0,
                                   settings=SamplingSettings(), batch_size=3)
    if reference is None:
        return {"reference": None, "features": generated.features}
    metrics = distribution_metrics(generated.features, reference, label=extractor.label, extra=("kid", "prc"),
                                   kid_subset_size=8)
    return {"reference": reference.statistics, "reference_features": reference.features, "streamed": streamed.statistics,
            "features": generated.features, "metrics": metrics, "reused": reference.reused}


def fit_with_fid(root: Path, cache: Path, **trainer_options) -> FIDCallback:
    fid = FIDCallback(every_n_steps=1, num_samples=NUM_SAMPLES, batch_size=3, cache_dir=str(cache),
                      feature_extractor=FeatureExtractorSpec(kind="checkpoint", name="pixels",
                                                             path=str(root / "pixels.pt")))
    data = ImageFolderDataModule(root=str(root / "real"), image_size=32, channels=3, batch_size=2, num_workers=0,
                                 val_fraction=0.0, flip=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=100, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[fid],
                        default_root_dir=str(root), **trainer_options)
    trainer.fit(StubDiffusion(torch.load(root / "samples.pt"), max_steps=2), datamodule=data)
    fid.logged = float(trainer.callback_metrics[fid.metric_key])
    return fid


def _worker(rank: int, world: int, root: str, port: int) -> None:
    torch.set_num_threads(1)
    # As torchrun would: Lightning then joins the process group instead of launching processes itself.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), NODE_RANK="0")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = measure(Path(root), Path(root) / "cache-distributed")
        result["lonely"] = gather_rows(torch.full((1, 3), 7.0) if rank == 0 else torch.zeros(0))  # a rank with no rows
        fid = fit_with_fid(Path(root), Path(root) / "cache-ddp", devices=world, strategy="ddp")
        result["history"], result["logged"] = fid.history, fid.logged
        torch.save(result, Path(root) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def setup_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    write_folder(root / "real", smooth_images(NUM_REFERENCE, seed=11))
    torch.save(torch.from_numpy(smooth_images(NUM_SAMPLES, seed=12)).permute(0, 3, 1, 2).float() / 127.5 - 1,
               root / "samples.pt")
    write_torchscript_extractor(root / "pixels.pt")
    return root


def test_shards_cover_every_index_once_in_order():
    for count in (0, 1, 11, 13, 50000):
        for world in (1, 2, 3, 8):
            blocks = [shard(count, rank, world) for rank in range(world)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_two_processes_give_the_single_process_result(setup_root):
    single = measure(setup_root, setup_root / "cache-single")
    single_fid = fit_with_fid(setup_root, setup_root / "cache-single", devices=1)
    mp.spawn(_worker, args=(2, str(setup_root), free_port()), nprocs=2, join=True)
    rank0 = torch.load(setup_root / "rank0.pt", weights_only=False)
    rank1 = torch.load(setup_root / "rank1.pt", weights_only=False)
    assert rank1["reference"] is None and not rank0["reused"]  # statistics live on rank 0 only
    assert torch.equal(rank0["features"], single["features"]) and torch.equal(rank1["features"], single["features"])
    assert rank0["features"].shape[0] == NUM_SAMPLES
    assert torch.equal(rank0["reference_features"], single["reference_features"])
    assert torch.allclose(rank0["reference"].sigma, single["reference"].sigma, rtol=1e-12, atol=0)
    for statistics in (rank0["streamed"], single["streamed"]):  # moments over 1 or 2 ranks = the gathered features'
        assert statistics.n == NUM_REFERENCE
        torch.testing.assert_close(statistics.mu, single["reference"].mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(statistics.sigma, single["reference"].sigma, rtol=1e-10, atol=1e-12)
    for key, value in single["metrics"].items():
        assert rank0["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert single["metrics"]["fd-pixels@11"] > 1e-3
    assert torch.equal(rank0["lonely"], torch.full((1, 3), 7.0)) and torch.equal(rank1["lonely"], rank0["lonely"])
    assert len(list((setup_root / "cache-distributed").glob("*.npz"))) == 1  # written once, by rank 0
    # The callback under DDP: the same numbers as one process, logged on both ranks.
    assert [step for step, _ in rank0["history"]] == [1, 2] == [step for step, _ in single_fid.history]
    for (_, distributed), (_, alone) in zip(rank0["history"], single_fid.history):
        assert distributed == pytest.approx(alone, rel=1e-9)
    assert rank1["logged"] == rank0["logged"] == pytest.approx(single_fid.logged, rel=1e-9)
    assert single_fid.logged == pytest.approx(single["metrics"]["fd-pixels@11"], rel=1e-9)
