"""FID during training: the numbers equal torch-fidelity's on the same images (with its real Inception loading
code and a weights file made here), the Frechet distance is exact, reference statistics are cached by what
defines them, a missing weights file stops a run at start, and the best-FID checkpoint keeps the best weights."""

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from scipy import linalg

from conftest import assert_one_line_error, run_cli
from fid_helpers import (StubDiffusion, smooth_images, write_bundle_extractor, write_folder,
                         write_random_inception_weights, write_torchscript_extractor)
from lightning_ldm.data.folder import ImageFolderDataModule
from lightning_ldm.errors import CheckpointError, ConfigError, MissingWeightsError
from lightning_ldm.metrics import FeatureExtractorSpec, FIDCallback, GaussianStatistics, ReconstructionFIDCallback
from lightning_ldm.metrics.features import build_feature_extractor, metric_label
from lightning_ldm.metrics.frechet import frechet_distance
from lightning_ldm.metrics.reference import load_or_compute_reference, unflipped
from lightning_ldm.metrics.weights import INCEPTION_URL, locate_weights

N = 12  # Inception runs at 299x299 on the CPU (~0.3 s an image): keep it small


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("weights") / "random-inception.pth")


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> FeatureExtractorSpec:
    path = write_torchscript_extractor(tmp_path_factory.mktemp("extractor") / "pixels.pt")
    return FeatureExtractorSpec(kind="checkpoint", name="pixels", path=str(path))


def to_signed(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def folder_data(root: Path, **kwargs) -> ImageFolderDataModule:
    options = dict(image_size=32, channels=3, batch_size=4, num_workers=0, val_fraction=0.0, flip=True)
    return ImageFolderDataModule(root=str(root), **{**options, **kwargs})


def fit(module, datamodule, callbacks, root: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", max_steps=100, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   default_root_dir=str(root))
    trainer = L.Trainer(callbacks=callbacks, **{**options, **kwargs})
    trainer.fit(module, datamodule=datamodule)
    return trainer


# --------------------------------------------------------------------------- the number itself
def test_callback_equals_torch_fidelity_on_the_same_image_folders(tmp_path, inception_file):
    import torch_fidelity

    generated, real = smooth_images(N, seed=1), smooth_images(N, seed=2)
    write_folder(tmp_path / "generated", generated)
    write_folder(tmp_path / "real", real)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "generated"), input2=str(tmp_path / "real"), cuda=False, fid=True, kid=True, isc=True,
        prc=True, feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_file),
        kid_subset_size=N, save_cpu_ram=True, verbose=False)

    fid = FIDCallback(every_n_steps=0, num_samples=N, batch_size=8, cache_dir=str(tmp_path / "cache"),
                      feature_extractor=FeatureExtractorSpec(weights_path=str(inception_file)),
                      extra_metrics=("kid", "is", "prc"), kid_subset_size=N)
    trainer = fit(StubDiffusion(to_signed(generated), max_steps=1), folder_data(tmp_path / "real"), [fid], tmp_path)
    ours = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert fid.metric_key == f"val/fid@{N}" and fid.history == [(1, pytest.approx(ours[fid.metric_key]))]
    assert ours[f"val/fid@{N}"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours[f"val/fid@{N}"] > 0.01  # a real difference between the two sets, not a degenerate 0 = 0
    assert ours[f"val/kid@{N}"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-7)
    assert ours[f"val/is@{N}"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours[f"val/precision@{N}"] == theirs["precision"] and ours[f"val/recall@{N}"] == theirs["recall"]
    assert ours[f"val/fid@{N}_best"] == ours[f"val/fid@{N}"]
    assert sorted((tmp_path / "images").glob("val_fid_samples_*.png"))  # a grid of the first samples


def test_frechet_distance_is_exact_on_analytic_and_rank_deficient_cases():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    gen = torch.Generator().manual_seed(0)
    # Commuting (diagonal) covariances: d^2 = |mu_1 - mu_2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    a, b = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1, torch.rand(5, generator=gen, dtype=torch.float64)
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    got = frechet_distance(GaussianStatistics(mu1, torch.diag(a), 10), GaussianStatistics(mu2, torch.diag(b), 10))
    assert got == pytest.approx(expected, rel=1e-12)
    # General covariances: the textbook formula with scipy's sqrtm.
    m1, m2 = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randn(6, 6, generator=gen, dtype=torch.float64)
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    textbook = float(np.trace(s1.numpy() + s2.numpy() - 2 * linalg.sqrtm(s1.numpy() @ s2.numpy()).real))
    got = frechet_distance(GaussianStatistics(torch.zeros(6, dtype=torch.float64), s1, 10),
                           GaussianStatistics(torch.zeros(6, dtype=torch.float64), s2, 10))
    assert got == pytest.approx(textbook, rel=1e-9)
    # From features, every branch (n < D uses the factor, n > D the square root) equals torch-fidelity's value.
    dim = 32
    sets = {n: torch.randn(n, dim, generator=gen).abs() * (1 + 0.1 * i) for i, n in enumerate((10, 12, 100, 150))}
    for n1, n2 in [(10, 12), (10, 100), (100, 10), (100, 150)]:
        theirs = fid_statistics_to_metric(fid_features_to_statistics(sets[n1]), fid_features_to_statistics(sets[n2]),
                                          False)["frechet_inception_distance"]
        ours = frechet_distance(GaussianStatistics.from_features(sets[n1]), GaussianStatistics.from_features(sets[n2]))
        assert ours == pytest.approx(theirs, rel=1e-6), (n1, n2)
    same = GaussianStatistics.from_features(sets[100])
    assert abs(frechet_distance(same, GaussianStatistics.from_features(sets[100]))) < 1e-9 * float(same.sigma.trace())


def test_fd_against_the_training_images_is_zero_and_grows_with_noise(tmp_path, pixels):
    images = smooth_images(64, seed=3)
    write_folder(tmp_path / "real", images)
    noise = {1: 0.0, 2: 0.05, 3: 0.15, 4: 0.4}
    fid = FIDCallback(every_n_steps=1, num_samples=64, batch_size=16, feature_extractor=pixels,
                      cache_dir=str(tmp_path / "cache"), at_fit_end=False)
    fit(StubDiffusion(to_signed(images), max_steps=4, noise_by_step=noise), folder_data(tmp_path / "real"), [fid],
        tmp_path)
    steps, values = zip(*fid.history)
    assert steps == (1, 2, 3, 4)
    assert abs(values[0]) < 1e-6, values  # the samples are the training images themselves
    assert all(later > earlier for earlier, later in zip(values, values[1:])), values
    assert fid.best == values[0] and fid.best_step == 1


class ClockedStub(StubDiffusion):
    """Its training clock reads 3 s per completed batch; every time decision must come through it."""

    def training_seconds(self) -> float:
        return 3.0 * self.batch_step


def test_fd_every_n_train_seconds_follows_the_training_clock_and_resumes(tmp_path, pixels):
    images = smooth_images(16, seed=6)
    write_folder(tmp_path / "real", images)
    # The clock is read every TIME_CHECK_EVERY (10) batches, before the batch is counted: at batch 10 it says
    # 27 s, at 20 57 s, at 30 87 s, ... An evaluation is due when a new 50 s period has begun at a reading.
    fid = FIDCallback(every_n_steps=0, every_n_train_seconds=50, num_samples=16, batch_size=8, feature_extractor=pixels,
                      cache_dir=str(tmp_path / "cache"), at_fit_end=False)
    fit(ClockedStub(to_signed(images), max_steps=60), folder_data(tmp_path / "real"), [fid], tmp_path)
    assert [step for step, _ in fid.history] == [20, 40, 60]  # 57 s (period 1), 117 s (2), 177 s (3)
    resumed = FIDCallback(every_n_steps=0, every_n_train_seconds=50, num_samples=16, batch_size=8,
                          feature_extractor=pixels, cache_dir=str(tmp_path / "cache"), at_fit_end=False)
    resumed.load_state_dict(fid.state_dict())
    module = ClockedStub(to_signed(images), max_steps=80)
    module.batch_step = 60  # as restored from the checkpoint
    fit(module, folder_data(tmp_path / "real"), [resumed], tmp_path)
    assert [step for step, _ in resumed.history] == [70]  # 207 s opens period 4; nothing measured twice
    with pytest.raises(ConfigError, match="every_n_train_seconds=0 must be positive"):
        FIDCallback(every_n_train_seconds=0, feature_extractor=pixels)


def test_a_time_based_fd_cannot_drive_a_checkpoint_that_counts_batches(tmp_path, pixels):
    write_folder(tmp_path / "real", smooth_images(8, seed=5))
    fid = FIDCallback(every_n_steps=0, every_n_train_seconds=5, num_samples=8, feature_extractor=pixels,
                      cache_dir=str(tmp_path / "c"))
    watch = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", monitor=fid.metric_key, every_n_train_steps=1)
    with pytest.raises(ConfigError, match="callbacks.best_fid=null"):
        fit(ClockedStub(to_signed(smooth_images(8)), max_steps=1), folder_data(tmp_path / "real"), [fid, watch],
            tmp_path, enable_checkpointing=True)


def test_best_fid_checkpoint_keeps_the_weights_of_the_best_measurement(tmp_path, pixels):
    images = smooth_images(32, seed=4)
    write_folder(tmp_path / "real", images)
    fid = FIDCallback(every_n_steps=1, num_samples=32, batch_size=16, feature_extractor=pixels,
                      cache_dir=str(tmp_path / "cache"))
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best-fid", mode="min",
                                               monitor=fid.metric_key, every_n_train_steps=1, save_top_k=1,
                                               save_on_train_epoch_end=True)
    module = StubDiffusion(to_signed(images), max_steps=4, noise_by_step={1: 0.4, 2: 0.1, 3: 0.3, 4: 0.5})
    trainer = fit(module, folder_data(tmp_path / "real"), [fid, best], tmp_path, enable_checkpointing=True)
    values = dict(fid.history)
    assert min(values, key=values.get) == 2
    assert float(best.best_model_score) == pytest.approx(values[2])
    saved = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    assert Path(best.best_model_path).name == "best-fid.ckpt" and saved["global_step"] == 2
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("FIDCallback"))
    assert state["best"] == pytest.approx(values[2]) and state["best_step"] == 2
    assert float(trainer.callback_metrics[fid.best_key]) == pytest.approx(values[2])


def test_checkpoints_must_watch_the_key_that_is_logged_when_it_is_measured(tmp_path, pixels):
    write_folder(tmp_path / "real", smooth_images(8, seed=5))
    for monitor, every, fragment in [("val/fid@8", 1, "val/fd-pixels@8"), ("val/fd-pixels@8", 3, "every_n_train_steps=3")]:
        fid = FIDCallback(every_n_steps=1, num_samples=8, feature_extractor=pixels, cache_dir=str(tmp_path / "c"))
        watch = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", monitor=monitor, every_n_train_steps=every)
        with pytest.raises(ConfigError, match=fragment):
            fit(StubDiffusion(to_signed(smooth_images(8)), max_steps=1), folder_data(tmp_path / "real"),
                [fid, watch], tmp_path, enable_checkpointing=True)


def test_fid_yaml_builds_a_callback_and_a_checkpoint_that_agree(compose, inception_file):
    cfg = compose("stage=diffusion", "callbacks=fid", f"callbacks.fid.feature_extractor.weights_path={inception_file}")
    fid, best = instantiate(cfg.callbacks.fid), instantiate(cfg.callbacks.best_fid)
    assert isinstance(fid, FIDCallback) and fid.spec.weights_path == str(inception_file)
    assert best.monitor == fid.metric_key == "val/fid@10000" and best._every_n_train_steps == fid.every_n_steps
    default = compose("stage=diffusion")  # the quickstart needs no Inception weights: no FID callback at all
    assert not any(str(node.get("_target_")).endswith("metrics.callback.FIDCallback")
                   for node in default.callbacks.values() if node)


# --------------------------------------------------------------------------- reference statistics
def test_reference_statistics_are_reused_until_data_count_or_extractor_change(tmp_path, pixels):
    write_folder(tmp_path / "real", smooth_images(24, seed=6))
    data = folder_data(tmp_path / "real")  # flip=True: the reference view must not flip
    data.setup()
    calls = []

    def reference(extractor, identity=None, count=None):
        return load_or_compute_reference(unflipped(data.train_dataset), identity=identity or data.identity(),
                                         extractor=extractor, cache_dir=tmp_path / "cache", count=count,
                                         batch_size=5, log=lambda message: None)

    extractor = build_feature_extractor(pixels)
    extractor.register_forward_hook(lambda *args: calls.append(1))
    first = reference(extractor)
    assert not first.reused and len(calls) == 5 and first.path.is_file()  # 24 images in batches of 5
    again = reference(extractor)
    assert again.reused and len(calls) == 5 and again.path == first.path
    assert torch.equal(again.statistics.mu, first.statistics.mu)
    assert torch.allclose(again.statistics.sigma, first.statistics.sigma, rtol=0, atol=0)
    others = [reference(extractor, count=12), reference(extractor, identity={**data.identity(), "image_size": 31})]
    other_net = FeatureExtractorSpec(kind="checkpoint", name="pixels",
                                     path=str(write_torchscript_extractor(tmp_path / "pixels2.pt", size=2)))
    others.append(reference(build_feature_extractor(other_net)))
    assert all(not r.reused for r in others) and len({r.path for r in [first, *others]}) == 4
    assert others[0].statistics.n == 12 and len(calls) == 5 + 3 + 5


# --------------------------------------------------------------------------- weights and extractors
def test_missing_weights_stop_in_one_line_naming_the_file(tmp_path, monkeypatch, inception_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError) as error:
        FIDCallback()
    message = str(error.value)
    assert "\n" not in message and "weights-inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and INCEPTION_URL in message
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        FIDCallback(feature_extractor=FeatureExtractorSpec(weights_path=str(tmp_path / "nowhere.pth")))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_file)
    assert locate_weights("inception-v3-compat", None, "x") == inception_file.resolve()


def test_a_run_asking_for_fid_without_weights_stops_at_start(tmp_path):
    result = run_cli("stage=diffusion", "autoencoder=identity", "callbacks=fid", "trainer=cpu", "logger=csv",
                     "run_name=r", cwd=tmp_path, timeout=300)
    assert_one_line_error(result, "weights-inception-2015-12-05-6726825d.pth", "callbacks.fid.feature_extractor")
    assert not (tmp_path / "outputs" / "diffusion" / "r" / "checkpoints").exists()


def test_custom_extractors_are_labelled_by_name_and_measure_what_they_say(tmp_path, pixels):
    assert metric_label(FeatureExtractorSpec()) == "fid"
    assert metric_label(FeatureExtractorSpec(name="vgg16")) == "fd-vgg16"
    assert metric_label(FeatureExtractorSpec(feature_layer="768")) == "fd-inception-v3-compat-768"
    assert metric_label(pixels) == "fd-pixels"
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    quantized = ((images + 1) * 127.5).round() / 127.5 - 1
    features = build_feature_extractor(pixels)(images)["features"]
    expected = torch.nn.functional.adaptive_avg_pool2d(quantized, 4).flatten(1)
    assert features.shape == (3, 16) and torch.allclose(features, expected, atol=1e-6)
    bundle = FeatureExtractorSpec(kind="checkpoint", name="tiny", path=str(write_bundle_extractor(tmp_path / "b.pt")))
    extractor = build_feature_extractor(bundle)
    net = extractor.net
    expected = net.pool(torch.relu(net.conv(quantized))).flatten(1)
    assert torch.allclose(extractor(images)["features"], expected, atol=1e-6) and extractor.layer == "pool"
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(CheckpointError, match="junk.pt"):
        build_feature_extractor(FeatureExtractorSpec(kind="checkpoint", name="junk", path=str(tmp_path / "junk.pt")))
    with pytest.raises(ConfigError, match="own label"):
        build_feature_extractor(FeatureExtractorSpec(kind="checkpoint", path=str(tmp_path / "b.pt")))
    with pytest.raises(ConfigError, match="dinov2"):
        build_feature_extractor(FeatureExtractorSpec(name="dinov2-vit-s-14"))


# --------------------------------------------------------------------------- stage 1
class StubAutoencoder(L.LightningModule):
    """Reconstructs by blurring with strength ``blur`` (0: perfect reconstructions)."""

    def __init__(self, blur: float):
        super().__init__()
        self.blur, self.batch_step, self.weight = blur, 0, torch.nn.Parameter(torch.zeros(()))
        self.autoencoder = self._reconstruct

    def _reconstruct(self, x, sample_posterior=False):
        smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return type("Out", (), {"reconstruction": (1 - self.blur) * x + self.blur * smooth})()

    def training_step(self, batch, batch_idx):
        return (self.weight - 1) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_rfid_is_zero_for_perfect_reconstructions_and_grows_with_blur(tmp_path, pixels):
    write_folder(tmp_path / "real", smooth_images(40, seed=7))
    values = []
    for blur in (0.0, 1.0):
        rfid = ReconstructionFIDCallback(num_images=16, batch_size=8, feature_extractor=pixels,
                                         cache_dir=str(tmp_path / "cache"))
        trainer = fit(StubAutoencoder(blur), folder_data(tmp_path / "real", val_fraction=0.5), [rfid], tmp_path,
                      max_steps=2, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0)
        assert rfid.metric_key == "val/rfd-pixels@16"
        values.append(float(trainer.callback_metrics[rfid.metric_key]))
    assert abs(values[0]) < 1e-6 and values[1] > 1e-3, values
    assert math.isfinite(values[1])


def test_the_default_stage2_run_can_say_fid_is_off(capsys, monkeypatch, tmp_path):
    from lightning_ldm.metrics import FIDDisabledNotice

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    FIDDisabledNotice().on_fit_start(type("Trainer", (), {"is_global_zero": True})(), None)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "callbacks=fid" in line and "weights-inception-2015-12-05-6726825d.pth" in line


# --------------------------------------------------------------------------- reference split
def pooled_statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of the pixels extractor's features (8-bit quantised, 4x4 average pool), in float64 numpy."""
    quantized = ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    features = torch.nn.functional.adaptive_avg_pool2d(quantized, 4).flatten(1).double().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)


def test_reference_split_val_uses_the_held_out_images_and_its_own_cache_file(tmp_path, pixels, capsys):
    images = smooth_images(48, seed=8)
    write_folder(tmp_path / "real", images)
    cache = tmp_path / "cache"

    def measured(split: str) -> FIDCallback:
        fid = FIDCallback(every_n_steps=0, num_samples=16, batch_size=8, feature_extractor=pixels,
                          cache_dir=str(cache), reference_split=split)
        fit(StubDiffusion(to_signed(images), max_steps=1), folder_data(tmp_path / "real", val_fraction=0.25),
            [fid], tmp_path)
        return fid

    val, train = measured("val"), measured("train")
    out = capsys.readouterr().out
    assert val.metric_key == train.metric_key == "val/fd-pixels@16"  # the name stays; the split is said in words
    assert "reference: 12 val-split images (held out)" in out and "against the val split at batch 1" in out
    assert "reference: 36 train-split images" in out and "against the train split at batch 1" in out

    data = folder_data(tmp_path / "real", val_fraction=0.25)  # flip=True: the reference must not flip
    data.setup()
    assert (len(data.train_dataset), len(data.val_dataset)) == (36, 12)
    by_hand = {"val": pooled_statistics(torch.stack([data.val_dataset[i]["image"] for i in range(12)])),
               "train": pooled_statistics(torch.stack([unflipped(data.train_dataset)[i]["image"] for i in range(36)]))}
    for fid, split in [(val, "val"), (train, "train")]:
        mu, sigma = by_hand[split]
        assert fid.reference.statistics.n == len(data.val_dataset if split == "val" else data.train_dataset)
        np.testing.assert_allclose(fid.reference.statistics.mu.double().numpy(), mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fid.reference.statistics.sigma.double().numpy(), sigma, rtol=1e-4, atol=1e-7)
        assert fid.reference.key["split"] == split and f"-{split}-" in fid.reference.path.name
    assert not torch.allclose(val.reference.statistics.mu, train.reference.statistics.mu, atol=1e-3)
    assert dict(val.history)[1] != pytest.approx(dict(train.history)[1])  # samples = all 48 images: both differ

    # The cache is keyed by split: neither run reused the other's file, and each split reuses its own.
    assert not val.reference.reused and not train.reference.reused and val.reference.path != train.reference.path
    assert sorted(p.name.split("-")[1] for p in cache.glob("*.npz")) == ["train", "val"]
    assert measured("val").reference.reused and measured("train").reference.reused


def test_reference_split_val_without_held_out_images_is_one_clear_error(tmp_path, pixels):
    write_folder(tmp_path / "real", smooth_images(8, seed=9))
    fid = FIDCallback(every_n_steps=0, num_samples=8, feature_extractor=pixels, cache_dir=str(tmp_path / "c"),
                      reference_split="val")
    with pytest.raises(ConfigError) as error:
        fit(StubDiffusion(to_signed(smooth_images(8)), max_steps=1), folder_data(tmp_path / "real", val_fraction=0.0),
            [fid], tmp_path)
    message = str(error.value)
    assert "\n" not in message and "callbacks.fid.reference_split=val" in message
    assert "data.val_fraction=0.0" in message and "reference_split=train" in message
    with pytest.raises(ConfigError, match="use train or val"):
        FIDCallback(feature_extractor=pixels, reference_split="test")


def test_a_resumed_run_cannot_switch_the_reference_split(pixels):
    state = FIDCallback(feature_extractor=pixels, reference_split="train").state_dict()
    assert state["reference_split"] == "train"
    with pytest.raises(ConfigError, match="measured against the train split"):
        FIDCallback(feature_extractor=pixels, reference_split="val").load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "reference_split"}  # a checkpoint from before the option
    FIDCallback(feature_extractor=pixels).load_state_dict(older)
    with pytest.raises(ConfigError):
        FIDCallback(feature_extractor=pixels, reference_split="val").load_state_dict(older)


def test_fid_yaml_takes_a_typed_reference_split(compose, pixels):
    from lightning_ldm.config.validate import validate_config

    extractor = ["callbacks.fid.feature_extractor.kind=checkpoint", "callbacks.fid.feature_extractor.name=pixels",
                 f"callbacks.fid.feature_extractor.path={pixels.path}", "callbacks.best_fid.monitor=val/fd-pixels@10000"]
    assert instantiate(compose("stage=diffusion", "callbacks=fid", *extractor).callbacks.fid).reference_split == "train"
    cfg = compose("stage=diffusion", "callbacks=fid", *extractor, "callbacks.fid.reference_split=val")
    validate_config(cfg)
    assert instantiate(cfg.callbacks.fid).reference_split == "val"
    with pytest.raises(ConfigError, match="callbacks.fid.reference_split"):
        validate_config(compose("stage=diffusion", "callbacks=fid", *extractor, "callbacks.fid.reference_split=test"))


def test_streaming_moments_equal_the_statistics_of_all_features():
    from lightning_ldm.metrics.frechet import GaussianStatistics, frechet_distance
    from lightning_ldm.metrics.moments import FeatureMoments

    generator = torch.Generator().manual_seed(0)
    features = torch.rand(300, 16, generator=generator) * 3 + 5  # a large mean: the subtraction is exercised
    moments = FeatureMoments(16, torch.device("cpu"))
    for chunk in features.split(37):
        moments.update(chunk)
    streamed, exact = moments.all_reduced().statistics(), GaussianStatistics.from_features(features)
    assert streamed.n == 300
    torch.testing.assert_close(streamed.mu, exact.mu, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(streamed.sigma, torch.from_numpy(np.cov(features.double().numpy(), rowvar=False)),
                               rtol=1e-10, atol=1e-12)
    other = GaussianStatistics.from_features(torch.rand(200, 16, generator=generator) * 3 + 5.2)
    assert frechet_distance(streamed, other) == pytest.approx(frechet_distance(exact, other), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureMoments(16, torch.device("cpu")).statistics()
