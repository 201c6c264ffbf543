"""Stage 2 and sampling through the real entry point, after a (very short) stage 1, offline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, run_cli

STAGE1 = ["stage=autoencoder", "run_name=ae", "max_steps=3", "trainer=cpu", "logger=none", "data.batch_size=8",
          "trainer.limit_val_batches=1", "trainer.val_check_interval=3", "module.image_log_every=0"]
STAGE2 = ["stage=diffusion", "run_name=ldm", "trainer=cpu", "logger=csv", "data.batch_size=8",
          "trainer.limit_val_batches=2", "trainer.val_check_interval=2", "module.scale_estimation_batches=2",
          "module.num_log_images=4", "module.sampling.steps=3", "module.warmup_steps=2"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pipeline")
    results = {"stage1": run_cli(*STAGE1, cwd=cwd)}
    assert results["stage1"].returncode == 0, results["stage1"].stderr[-3000:]
    results["stage2"] = run_cli(*STAGE2, "max_steps=4", cwd=cwd)
    assert results["stage2"].returncode == 0, results["stage2"].stderr[-3000:]
    # The export the run started from disappears: a resumed run keeps the first stage in its checkpoint.
    (cwd / "outputs" / "autoencoder" / "ae" / "export" / "autoencoder.safetensors").unlink()
    results["resumed"] = run_cli(*STAGE2, "max_steps=6", cwd=cwd)
    assert results["resumed"].returncode == 0, results["resumed"].stderr[-3000:]
    results["sample"] = run_cli("stage=sample", "run_name=s", "sample.num_samples=6", "sample.batch_size=4",
                                "sample.steps=3", cwd=cwd)
    assert results["sample"].returncode == 0, results["sample"].stderr[-3000:]
    return cwd, results


def test_stage2_finds_the_stage1_export_and_checks_it(pipeline):
    cwd, results = pipeline
    out = results["stage2"].stdout
    assert f"newest matching stage-1 export {cwd / 'outputs/autoencoder/ae/export/autoencoder.safetensors'}" in out
    assert "First stage check: reconstruction PSNR" in out and "Stage 2: scale_factor" in out


def test_stage2_writes_checkpoint_export_grids_and_metrics(pipeline):
    cwd, _ = pipeline
    run = cwd / "outputs" / "diffusion" / "ldm"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["batch_step"] == 6 and checkpoint["lightning_ldm"]["kind"] == "diffusion"
    assert not list((run / "checkpoints").glob("*-v*.ckpt"))  # one last.ckpt, whoever saved it last
    assert any(k.startswith("first_stage.autoencoder.") for k in checkpoint["state_dict"])
    assert (run / "export" / "ldm-ema.safetensors").is_file()
    assert sorted(p.name for p in (run / "images").glob("val_samples_*.png"))
    assert "val/loss" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]


def test_resume_keeps_the_checkpoints_first_stage_and_scale(pipeline):
    cwd, results = pipeline
    out = results["resumed"].stdout
    assert "Resuming from" in out and "First stage: from the stage-2 checkpoint" in out
    scales = [line for line in (results["stage2"].stdout + out).splitlines() if line.startswith("Stage 2: scale_factor")]
    assert len(scales) == 2 and scales[0].split(";")[0] == scales[1].split(";")[0]


def test_sample_stage_writes_images_and_a_grid(pipeline):
    cwd, results = pipeline
    run = cwd / "outputs" / "sample" / "s"
    images = sorted((run / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(6)]
    assert Image.open(images[0]).size == (32, 32)
    assert (run / "grid.png").is_file() and "ldm/checkpoints/last.ckpt" in results["sample"].stdout
    assert json.loads((run / "run_info.json").read_text())["command"].endswith("sample.steps=3")


def test_missing_export_path_is_one_line(tmp_path):
    result = run_cli("stage=diffusion", f"autoencoder.path={tmp_path / 'nope.safetensors'}", "trainer=cpu",
                     "logger=none", cwd=tmp_path)
    assert_one_line_error(result, "autoencoder export not found", "nope.safetensors")


def test_no_export_at_all_says_how_to_make_one(tmp_path):
    result = run_cli("stage=diffusion", "trainer=cpu", "logger=none", cwd=tmp_path)
    assert_one_line_error(result, "no stage-1 export", "stage=autoencoder", "autoencoder.path=")


def test_a_file_that_is_not_an_export_is_refused(tmp_path):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_text("not weights")
    result = run_cli("stage=diffusion", f"autoencoder.path={bogus}", "trainer=cpu", "logger=none", cwd=tmp_path)
    assert_one_line_error(result, str(bogus))


def test_sample_without_any_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_cli("stage=sample", cwd=tmp_path), "no stage-2 checkpoint", "sample.ckpt=")


def test_a_sample_file_cut_short_is_made_again_on_rerun(pipeline):
    cwd, results = pipeline
    image = cwd / "outputs" / "sample" / "s" / "images" / "000002.png"
    whole = image.read_bytes()
    before = np.asarray(Image.open(image), dtype=np.int16)
    image.write_bytes(whole[: len(whole) // 2])  # what a crash mid-write left behind before writes were atomic
    rerun = run_cli("stage=sample", "run_name=s", "sample.num_samples=6", "sample.batch_size=4", "sample.steps=3",
                    cwd=cwd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 existing sample file(s) are unreadable and are made again: 000002.png" in rerun.stdout
    # Seeded: the same image again, whole (up to rounding: it is now made in a batch of one, not of four).
    assert np.abs(np.asarray(Image.open(image), dtype=np.int16) - before).max() <= 2
    assert not list(image.parent.glob(".*tmp*"))
    history = json.loads((image.parent.parent / "run_info.json").read_text())["history"]
    assert [entry["event"] for entry in history] == ["start", "start"]


def test_a_checkpoint_with_non_finite_weights_is_refused_rather_than_sampled_black(pipeline, tmp_path):
    cwd, _ = pipeline
    checkpoint = torch.load(cwd / "outputs/diffusion/ldm/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if k.startswith("ema.") and k.endswith("weight"))
    checkpoint["state_dict"][key].fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    result = run_cli("stage=sample", "run_name=diverged", f"sample.ckpt={tmp_path / 'diverged.ckpt'}",
                     "sample.num_samples=2", "sample.steps=2", cwd=cwd)
    assert_one_line_error(result, "non-finite images", "diverged.ckpt")
    assert not list((cwd / "outputs/sample/diverged/images").glob("*.png"))
