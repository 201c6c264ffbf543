"""``stage=benchmark`` on tiny presets (CPU: it runs and reports, no timing assertions), synthetic data, and the
speed settings that must not change the math."""

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from lightning_ldm.data.synthetic import SyntheticDataModule

TINY = ["logger=none", "benchmark.warmup=1", "benchmark.steps=1", "benchmark.repeats=2", "benchmark.num_workers=0"]


def test_stage2_benchmark_writes_its_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("stage=benchmark", "unet=tiny", "autoencoder.regularizer=kl", "autoencoder.downsampling_factor=2",
                     "data.batch_size=2", "benchmark.sample_batch_size=2", "benchmark.sample_steps=2",
                     "benchmark.sample_repeats=1", f"benchmark.output={out}", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["stage 2: cached latents", "stage 2: encoding on the fly", "sampling: dpmpp_2m 2 steps + decode"]
    assert report["stage"] == "diffusion" and report["device"] == "cpu" and report["compile"] is False
    assert report["float32_matmul_precision"] == "high"  # the config default, set before the stage runs
    cached, on_the_fly, sampling = report["rows"]
    # FlopCounterMode counted real work: encoding on the fly adds the encoder's forward to the same UNet step.
    assert 0 < cached["gflop_per_image"] < on_the_fly["gflop_per_image"]
    assert all(row["images_per_sec"] > 0 and len(row["windows_images_per_sec"]) >= 1 for row in report["rows"])
    assert report["cached_over_on_the_fly"] == pytest.approx(cached["images_per_sec"] / on_the_fly["images_per_sec"],
                                                             rel=1e-2)
    assert "| stage 2: cached latents | 2 |" in result.stdout and "50,000 samples:" in result.stdout
    # The sampling row says where its time goes: the decode, timed alone as generate() runs it.
    assert set(sampling["parts_ms_per_image"]) == {"solver", "decode"}
    assert sampling["parts_ms_per_image"]["decode"] > 0 and "decode " in sampling["note"]


def test_stage1_benchmark_times_the_discriminator_off_and_on(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("stage=benchmark", "benchmark.stage=autoencoder", "data.batch_size=2",
                     f"benchmark.output={out}", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    off, on = json.loads(out.read_text())["rows"]
    assert off["name"].endswith("discriminator off") and on["name"].endswith("+ discriminator")
    assert on["gflop_per_image"] > off["gflop_per_image"] > 0  # the discriminator's forward and backward


def test_benchmark_of_an_export_of_unknown_shape_says_what_to_set(tmp_path):
    result = run_cli("stage=benchmark", "unet=tiny", *TINY, cwd=tmp_path)
    assert_one_line_error(result, "autoencoder.regularizer", "autoencoder.downsampling_factor")


def test_synthetic_images_are_reproducible_varied_and_labelled():
    data = SyntheticDataModule(num_images=40, image_size=32, channels=3, num_classes=4, batch_size=4,
                               num_workers=0, val_fraction=0.1)
    data.setup()
    again = SyntheticDataModule(num_images=40, image_size=32, channels=3, num_classes=4, batch_size=4,
                                num_workers=0, val_fraction=0.1)
    again.setup()
    first, second = data.train_dataset[0], again.train_dataset[0]
    assert torch.equal(first["image"], second["image"]) and first["image"].shape == (3, 32, 32)
    images = torch.stack([data.train_dataset[i]["image"] for i in range(8)])
    assert images.min() >= -1 and images.max() <= 1
    assert images.std(dim=(1, 2, 3)).min() > 0.05  # never constant: timing on zeros flatters
    assert (images[0] - images[1]).abs().mean() > 0.05  # and not the same image twice
    labels = [data.train_dataset[i]["label"] for i in range(len(data.train_dataset))]
    assert set(labels) <= {0, 1, 2, 3} and len(set(labels)) == 4
    assert len(data.train_dataset) + len(data.val_dataset) == 40


def test_rows_pick_what_is_timed_and_the_json_keeps_every_row_finished_before_a_failure(compose, tmp_path,
                                                                                         monkeypatch):
    import lightning_ldm.tasks.benchmark as task

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(task, "measure_sampling", fails)
    out = tmp_path / "bench.json"
    cfg = compose("stage=benchmark", "unet=tiny", "autoencoder.regularizer=kl", "autoencoder.downsampling_factor=2",
                  "data.batch_size=2", "benchmark.rows=[cached,sampling]", f"benchmark.output={out}", *TINY)
    from hydra import initialize_config_dir

    from lightning_ldm.cli import CONFIG_DIR
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # benchmark composes the stage
        with pytest.raises(RuntimeError, match="out of memory"):
            task.benchmark(cfg)
    report = json.loads(out.read_text())
    assert [row["name"] for row in report["rows"]] == ["stage 2: cached latents"]  # on_the_fly was not asked for
    assert "cached_over_on_the_fly" not in report


def test_a_sampler_that_does_not_exist_fails_before_anything_is_timed(tmp_path):
    result = run_cli("stage=benchmark", "benchmark.sampler=euler_magic", *TINY, cwd=tmp_path)
    assert_one_line_error(result, "benchmark.sampler", "dpmpp_2m")


def test_an_unknown_row_is_one_clear_error(tmp_path):
    result = run_cli("stage=benchmark", "benchmark.stage=autoencoder", "benchmark.rows=[cached]", *TINY, cwd=tmp_path)
    assert_one_line_error(result, "benchmark.rows", "discriminator_off")


def test_peers_cross_attention_pair_is_one_configuration_and_runs_on_cpu(tmp_path):
    """experiments/benchmarks/peers.py xattn_train: our UNet with conditioning by cross-attention against diffusers'
    UNet2DConditionModel mapped from its config. At full size (meta device: no memory) both have the released LDM
    text-to-image UNet's parameters, heads and projections; at tiny size the pair's CPU dry run trains both."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    diffusers = pytest.importorskip("diffusers")
    from conftest import REPO

    spec = importlib.util.spec_from_file_location("peers", REPO / "experiments" / "benchmarks" / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    with torch.device("meta"):
        ours, theirs = peers.build_crossattn_unet("ours", 32), peers.build_crossattn_unet("diffusers", 32)
    assert peers.n_params(ours) == peers.n_params(theirs) == 872_300_484
    config = peers.diffusers_crossattn_config(ours.config, 32)
    assert config["block_out_channels"] == (320, 640, 1280, 1280) and config["attention_head_dim"] == 8
    assert config["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert config["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    # attention_head_dim is diffusers' head *count* in this (SD-1) naming: 8 heads of 40 channels, as ours
    mine, peer = ours.input_blocks[1][1], theirs.down_blocks[0].attentions[0]
    assert mine.blocks[0].self_attn.heads == peer.transformer_blocks[0].attn1.heads == 8
    assert peer.transformer_blocks[0].attn1.inner_dim // 8 == 40 and isinstance(peer.proj_in, torch.nn.Conv2d)
    assert peer.transformer_blocks[0].attn2.to_k.in_features == mine.blocks[0].cross_attn.to_kv.in_features == 1280

    out = tmp_path / "peers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(Path(diffusers.__file__).parents[1]), str(REPO / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "benchmarks" / "peers.py"), "--dry-run",
                             "--device", "cpu", "--only", "xattn_train", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["results"]}
    assert set(rows) == {"ours-eager", "diffusers-eager"}, rows
    assert all(row["status"] == "ok" and row["img_per_s"] > 0 and row["gflop_per_img"] > 0 for row in rows.values())
    assert rows["ours-eager"]["params_m"] == rows["diffusers-eager"]["params_m"]
    assert "AttnProcessor2_0" in rows["diffusers-eager"]["note"]  # diffusers' default: SDPA
    assert report["meta"]["xattn"]["diffusers"]["cross_attention_dim"] == 16  # the tiny config, mapped
