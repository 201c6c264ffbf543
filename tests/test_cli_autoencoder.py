"""Stage 1 through the real entry point (``python -m lightning_ldm``), as a user runs it, offline."""

import json

import pytest
import torch
import yaml

from conftest import assert_one_line_error, run_cli
from lightning_ldm.autoencoder.export import load_autoencoder_export
from wandb_offline import read_history, read_run

FAST = ["trainer=cpu", "data.batch_size=8", "trainer.limit_val_batches=2", "trainer.val_check_interval=3",
        "module.image_log_every=2", "loss.disc_start=2", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Four batches of stage 1 with W&B offline (no credentials), then three more resumed in the same run."""
    cwd = tmp_path_factory.mktemp("stage1")
    first = run_cli("stage=autoencoder", "run_name=r", "max_steps=4", *FAST, cwd=cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("stage=autoencoder", "run_name=r", "max_steps=7", *FAST, cwd=cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    return cwd / "outputs" / "autoencoder" / "r", first, second


def test_run_directory_records_everything_needed_to_rerun(trained_run):
    run_dir, first, _ = trained_run
    assert f"Run directory: {run_dir}" in first.stdout
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["git_revision"] and info["versions"]["torch"] == torch.__version__
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["max_steps"] in (4, 7) and config["module"]["autoencoder"]["ch_mult"] == [1, 2, 2]
    assert "max_steps=7" in info["overrides"]


def test_checkpoints_export_and_images_are_written(trained_run):
    run_dir, _, _ = trained_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["batch_step"] == 7
    assert not any(k.startswith("loss.lpips") or "_frozen" in k for k in checkpoint["state_dict"])
    model, metadata = load_autoencoder_export(run_dir / "export" / "autoencoder.safetensors")
    assert metadata["data"]["name"] == "digits" and metadata["info"]["batch_step"] == 7
    assert not any("discriminator" in k for k in model.state_dict())
    for key in ("autoencoder.", ):
        trained = {k[len(key):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(key)}
        assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in (run_dir / "images").glob("val_reconstructions_*.png"))


def test_resume_continues_the_step_counter_and_the_wandb_run(trained_run):
    run_dir, _, second = trained_run
    assert "Resuming from" in second.stdout
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.split("-")[-1] for run in runs}) == 1, runs  # same run id
    assert "wandb sync" in second.stdout


def test_wandb_offline_run_holds_metrics_and_images(trained_run):
    run_dir, first, _ = trained_run
    assert "W&B: offline" in first.stdout
    rows = read_history(run_dir)
    keys = set().union(*rows)
    assert {"train/rec_loss", "train/d_loss", "train/d_weight", "val/psnr", "val/ssim"} <= keys
    images = [row for row in rows if "val/reconstructions/_type" in row or "val/reconstructions" in row]
    assert images, sorted(keys)
    media = list(run_dir.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert media


def test_discriminator_starts_at_disc_start(trained_run):
    run_dir, _, _ = trained_run
    rows = [r for r in read_history(run_dir) if "train/d_weight" in r]
    weights = {int(r["trainer/global_step"]): r["train/d_weight"] for r in rows}
    assert set(weights) >= {0, 1, 2, 3}, weights  # the logger's step axis counts batches, not optimizer steps
    assert weights[0] == weights[1] == 0 and weights[2] > 0 and weights[3] > 0, weights


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_key_stops_at_start(tmp_path):
    result = run_cli("stage=autoencoder", "+module.learning_rate=1", cwd=tmp_path)
    assert_one_line_error(result, "module.learning_rate: unknown key", "valid keys: ", "lr,")
    result = run_cli("stage=autoencoder", "+module.max_step=1", cwd=tmp_path)
    assert_one_line_error(result, "module.max_step: unknown key", "did you mean 'max_steps'")


def test_wrong_type_stops_at_start(tmp_path):
    assert_one_line_error(run_cli("stage=autoencoder", "data.batch_size=many", cwd=tmp_path),
                          "data.batch_size: expected int")


def test_missing_data_root_names_the_path(tmp_path):
    result = run_cli("stage=autoencoder", "data=folder", f"data.root={tmp_path / 'nowhere'}", "trainer=cpu",
                     "logger=none", cwd=tmp_path)
    assert_one_line_error(result, str(tmp_path / "nowhere"))


def test_corrupt_image_names_the_file(tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (40, 36), (index * 40, 10, 10)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    for check in ("data.verify=true", "data.verify=false"):  # before training, or when it is read
        result = run_cli("stage=autoencoder", "data=folder", f"data.root={tmp_path / 'images'}", "data.num_workers=0",
                         "data.batch_size=2", "data.val_fraction=0", "trainer=cpu", "logger=none", check, cwd=tmp_path)
        assert_one_line_error(result, "broken.png")


def test_image_size_not_divisible_by_f_is_refused(tmp_path):
    result = run_cli("stage=autoencoder", "autoencoder=kl-f4-small", "data.image_size=30", "trainer=cpu",
                     "logger=none", cwd=tmp_path)
    assert_one_line_error(result, "30", "f=4")


def test_missing_lpips_weights_name_the_file(tmp_path):
    result = run_cli("stage=autoencoder", "loss=lpips-gan", "trainer=cpu", "logger=none", cwd=tmp_path)
    assert_one_line_error(result, "vgg16-397923af.pth", "loss.lpips_weights")


def test_wandb_run_is_tagged_grouped_and_carries_the_config(trained_run):
    run_dir, _, _ = trained_run
    info = read_run(run_dir)
    assert {"stage:autoencoder", "data:digits"} <= info["tags"] and info["group"] == "autoencoder"
    assert {"module", "data", "trainer", "seed"} <= info["config"]
    assert info["metric_summaries"]["val/rec_loss"].min and info["metric_summaries"]["val/psnr"].max
