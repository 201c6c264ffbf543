"""``stage=evaluate`` on tiny models: the numbers equal an independent computation on the same images, and the
JSON report beside the checkpoint holds what is needed to reproduce them; through the real entry point too."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from conftest import run_cli
from fid_helpers import write_torchscript_extractor
from lightning_ldm.autoencoder.export import save_autoencoder_export
from lightning_ldm.autoencoder.model import SMALL_PRESETS, Autoencoder
from lightning_ldm.config.validate import validate_config
from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.diffusion.checkpoint import load_diffusion_model, save_ema_export
from lightning_ldm.diffusion.module import DiffusionModule
from lightning_ldm.diffusion.schedules import NoiseSchedule
from lightning_ldm.errors import ConfigError, MissingWeightsError
from lightning_ldm.latent.first_stage import identity_first_stage
from lightning_ldm.metrics.reference import reference_indices
from lightning_ldm.metrics.weights import file_sha256
from lightning_ldm.tasks.evaluate import evaluate
from lightning_ldm.tasks.sample import initial_noise
from lightning_ldm.unet.model import PRESETS, UNet

SAMPLES, REFERENCE = 16, 40


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A pixel-space stage-2 EMA export (random tiny UNet, 32x32 digits), a stage-1 export, a cheap extractor."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    module = DiffusionModule(first_stage=identity_first_stage(image_channels=1), unet=functools.partial(UNet, **PRESETS["tiny"]),
                             schedule=NoiseSchedule(), image_size=32, sampling={"sampler": "ddim", "steps": 2}, num_log_images=0)
    stage2 = save_ema_export(module, root / "diffusion" / "export" / "ldm-ema.safetensors")
    stage1 = save_autoencoder_export(Autoencoder(**{**SMALL_PRESETS["kl-f2-small"], "in_channels": 1}),
                                     root / "autoencoder" / "export" / "autoencoder.safetensors",
                                     data=DigitsDataModule().identity())
    return {"root": root, "stage2": stage2, "stage1": stage1,
            "pixels": write_torchscript_extractor(root / "pixels.pt")}


def options(files: dict, ckpt: Path, *extra: str) -> list[str]:
    return ["stage=evaluate", f"evaluate.ckpt={ckpt}", "evaluate.accelerator=cpu", "evaluate.batch_size=8",
            "evaluate.feature_extractor.kind=checkpoint", "evaluate.feature_extractor.name=pixels",
            f"evaluate.feature_extractor.path={files['pixels']}", *extra]


def pooled(images: torch.Tensor) -> torch.Tensor:
    quantized = ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    return torch.nn.functional.adaptive_avg_pool2d(quantized, 4).flatten(1)


def test_stage2_report_matches_an_independent_computation(compose, files):
    cfg = compose(*options(files, files["stage2"], f"evaluate.num_samples={SAMPLES}", "evaluate.kid_subset_size=8",
                           f"evaluate.reference_num_images={REFERENCE}"))
    validate_config(cfg)
    report = evaluate(cfg)
    path = files["stage2"].parent / "ldm-ema.eval-16-ddim2-eta0.0-cfg1.0-ema-seed0.json"
    assert path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(report, default=str))
    assert (Path(cfg.paths.run_dir) / "report.json").is_file() and (Path(cfg.paths.run_dir) / "grid.png").is_file()

    module = load_diffusion_model(str(files["stage2"])).eval()
    images, _ = module.generate(SAMPLES, x_T=initial_noise(list(range(SAMPLES)), (1, 32, 32)), sampler="ddim", steps=2)
    data = DigitsDataModule()
    data.setup()
    real = torch.stack([data.train_dataset[i]["image"] for i in reference_indices(len(data.train_dataset), REFERENCE)])
    expected = fid_statistics_to_metric(fid_features_to_statistics(pooled(images)),
                                        fid_features_to_statistics(pooled(real)), False)["frechet_inception_distance"]
    metrics = report["metrics"]
    assert metrics["fd-pixels@16"] == pytest.approx(expected, rel=1e-4) and expected > 0.01
    assert {"kd-pixels@16", "kd-pixels@16_std", "precision-pixels@16", "recall-pixels@16"} <= set(metrics)
    assert not any(key.startswith(("fid", "kid", "is@")) for key in metrics)  # not Inception: never called FID
    assert "Inception Score skipped" in report["notes"][0]

    assert report["num_samples"] == SAMPLES and report["seeds"] == [0, SAMPLES - 1]
    sampling = report["sampling"]
    assert (sampling["name"], sampling["steps"], sampling["eta"], sampling["guidance_scale"]) == ("ddim", 2, 0.0, 1.0)
    assert sampling["use_ema"] and report["weights"] == "ema"
    assert report["feature_extractor"]["sha256"] == file_sha256(files["pixels"])
    reference = report["reference"]
    assert reference["n"] == REFERENCE and Path(reference["file"]).is_file() and len(reference["sha256"]) == 64
    assert reference["key"]["data"] == data.identity() == report["data"]
    assert report["checkpoint_sha256"] == file_sha256(files["stage2"]) and report["versions"]["torch"]


def test_stage1_report_has_rfid_psnr_and_ssim_of_the_same_images(compose, files):
    cfg = compose(*options(files, files["stage1"], "evaluate.num_samples=24", "evaluate.split=val"))
    report = evaluate(cfg)
    metrics = report["metrics"]
    assert set(metrics) == {"rfd-pixels@24", "psnr@24", "ssim@24"}
    assert report["split"] == "val" and report["reference"]["key"]["split"] == "val"
    data = DigitsDataModule()
    data.setup()
    x = torch.stack([data.val_dataset[i]["image"] for i in reference_indices(len(data.val_dataset), 24)])
    from lightning_ldm.autoencoder.export import load_autoencoder_export

    model, _ = load_autoencoder_export(files["stage1"])
    with torch.no_grad():
        x_hat = model.eval()(x, sample_posterior=False).reconstruction.clamp(-1, 1)
    mse = ((x_hat - x) / 2).pow(2).mean(dim=(1, 2, 3))
    assert metrics["psnr@24"] == pytest.approx(float((-10 * torch.log10(mse)).mean()), rel=1e-4)
    expected = fid_statistics_to_metric(fid_features_to_statistics(pooled(x_hat)), fid_features_to_statistics(pooled(x)),
                                        False)["frechet_inception_distance"]
    assert metrics["rfd-pixels@24"] == pytest.approx(expected, rel=1e-4) and expected > 0
    assert -1 <= metrics["ssim@24"] <= 1


def test_data_that_does_not_match_the_model_or_no_checkpoint_is_refused(compose, files):
    cfg = compose(*options(files, files["stage2"], "evaluate.num_samples=4", "data.image_size=28"))
    with pytest.raises(ConfigError, match="does not match the model"):
        evaluate(cfg)
    with pytest.raises(ConfigError, match="evaluate.ckpt is not set"):
        evaluate(compose("stage=evaluate"))


def test_missing_inception_weights_stop_the_evaluation_before_any_work(compose, files, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    cfg = compose("stage=evaluate", f"evaluate.ckpt={files['stage2']}", "evaluate.accelerator=cpu")
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth") as error:
        evaluate(cfg)
    assert "evaluate.feature_extractor.weights_path" in str(error.value) and "\n" not in str(error.value)
    assert not (Path(cfg.paths.run_dir) / "run_info.json").exists()


def test_cli_writes_the_report(tmp_path, files):
    result = run_cli(*options(files, files["stage2"], "evaluate.num_samples=8", "evaluate.metrics=[fid]",
                              "evaluate.reference_num_images=16", "evaluate.report=" + str(tmp_path / "r.json")),
                     "run_name=e", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert f"fd-pixels@8 = {report['metrics']['fd-pixels@8']:.6g}" in result.stdout
    assert np.isfinite(report["metrics"]["fd-pixels@8"]) and "Report:" in result.stdout
    assert (tmp_path / "outputs" / "evaluate" / "e" / "report.json").is_file()


def test_measuring_fid_leaves_the_training_random_stream_alone(files):
    """Seeded generators only: a run with FID draws the same training noise as a run without it."""
    from lightning_ldm.metrics import FeatureExtractorSpec, build_feature_extractor
    from lightning_ldm.metrics.sampling import SamplingSettings, generated_features

    module = load_diffusion_model(str(files["stage2"])).eval()
    extractor = build_feature_extractor(FeatureExtractorSpec(kind="checkpoint", name="pixels", path=str(files["pixels"])))
    before = torch.get_rng_state()
    first = generated_features(module, extractor, num_samples=4, seed_start=3, batch_size=3,
                               settings=SamplingSettings(sampler="ddim", steps=2, eta=1.0))
    assert torch.equal(torch.get_rng_state(), before)
    again = generated_features(module, extractor, num_samples=4, seed_start=3, batch_size=3,
                               settings=SamplingSettings(sampler="ddim", steps=2, eta=1.0))
    assert torch.equal(first.features, again.features)  # fixed seeds: every evaluation sees the same noise


def test_stage2_against_the_held_out_split_says_so_and_matches_its_images(compose, files, capsys):
    cfg = compose(*options(files, files["stage2"], f"evaluate.num_samples={SAMPLES}", "evaluate.metrics=[fid]",
                           "evaluate.reference_split=val"))
    validate_config(cfg)
    report = evaluate(cfg)
    out = capsys.readouterr().out
    data = DigitsDataModule()
    data.setup()
    held_out = torch.stack([data.val_dataset[i]["image"] for i in range(len(data.val_dataset))])  # null: all of them
    assert report["reference_split"] == "val" and report["reference"]["key"]["split"] == "val"
    assert report["reference"]["n"] == len(data.val_dataset) == 500 and "-val-" in Path(report["reference"]["file"]).name
    assert report["evaluate"]["reference_split"] == "val"
    assert (files["stage2"].parent / "ldm-ema.eval-16-ddim2-eta0.0-cfg1.0-ema-seed0-refval.json").is_file()

    module = load_diffusion_model(str(files["stage2"])).eval()
    images, _ = module.generate(SAMPLES, x_T=initial_noise(list(range(SAMPLES)), (1, 32, 32)), sampler="ddim", steps=2)
    expected = fid_statistics_to_metric(fid_features_to_statistics(pooled(images)),
                                        fid_features_to_statistics(pooled(held_out)), False)["frechet_inception_distance"]
    value = report["metrics"]["fd-pixels@16"]
    assert value == pytest.approx(expected, rel=1e-4)
    assert f"fd-pixels@16 = {value:.6g} (against the val split)" in out  # same metric name; the line says the split

    train = evaluate(compose(*options(files, files["stage2"], f"evaluate.num_samples={SAMPLES}", "evaluate.metrics=[fid]")))
    assert train["reference_split"] == "train" and train["reference"]["file"] != report["reference"]["file"]
    assert train["reference"]["n"] == len(data.train_dataset) and train["metrics"]["fd-pixels@16"] != pytest.approx(value)


def test_held_out_reference_without_held_out_images_is_one_clear_error(compose, files):
    cfg = compose(*options(files, files["stage2"], "evaluate.num_samples=4", "evaluate.reference_split=val",
                           "data.val_fraction=0"))
    with pytest.raises(ConfigError) as error:
        evaluate(cfg)
    message = str(error.value)
    assert "\n" not in message and "evaluate.reference_split=val" in message and "data.val_fraction=0" in message
    with pytest.raises(ConfigError, match="evaluate.reference_split"):
        validate_config(compose(*options(files, files["stage2"], "evaluate.reference_split=test")))
