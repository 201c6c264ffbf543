"""experiments/cifar10_f_sweep/plot.py on fake results laid out as run.sh returns them: FD points come from the
rows that measured them, loss rows get their training seconds from the clock readings (not from the values the
CSV logger repeats on later rows), missing runs are skipped, and mixed devices are flagged."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO


FRAMEWORK_COLUMNS = ["epoch", "perf/images_per_sec", "perf/train_seconds", "step", "train/ema_decay", "train/loss",
                     "train/lr", "val/fd-cifar10-resnet9@5000", "val/fd-cifar10-resnet9@5000_best", "val/loss"]


@pytest.fixture(scope="module")
def plot():
    spec = importlib.util.spec_from_file_location("f_sweep_plot", REPO / "experiments" / "cifar10_f_sweep" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def framework_rows(seconds_per_batch: float, fd_values: dict[int, float], batches: int) -> list[dict]:
    """What the CSV logger writes: train/loss every 10 batches (step = batch index), the Throughput callback's
    perf values every 50 batches and then repeated on later rows, FD rows at the batch count it was measured."""
    rows, last_perf = [], None
    for batch in range(1, batches + 1):
        if batch % 50 == 0:
            last_perf = {"perf/images_per_sec": 128 / seconds_per_batch, "perf/train_seconds": batch * seconds_per_batch}
        if batch in fd_values:
            rows.append({"step": batch, "perf/train_seconds": batch * seconds_per_batch + 0.01,
                         "val/fd-cifar10-resnet9@5000": fd_values[batch]})
        if batch % 10 == 0:
            rows.append({"epoch": 0, "step": batch - 1, "train/loss": 1.0 / batch, **(last_perf or {})})
    return rows


def fake_results(root: Path, second_device: str = "NVIDIA H100 80GB HBM3") -> None:
    for name, spb, fd, device in [("pixel", 0.1, {100: 80.0, 200: 40.0, 230: 35.0}, "NVIDIA H100 80GB HBM3"),
                                  ("ldm-f4", 0.05, {100: 60.0, 200: 30.0, 300: 20.0, 400: 21.0, 460: 19.0}, second_device)]:
        run = root / "diffusion" / name
        write_csv(run / "csv" / "metrics.csv", FRAMEWORK_COLUMNS, framework_rows(spb, fd, max(fd)))
        (run / "run_info.json").write_text(json.dumps({"versions": {"gpu": device}}))
    write_csv(root / "peer_ddpm" / "curve.csv", ["train_seconds", "step", "images_seen", "fd"],
              [{"train_seconds": 6.0, "step": 50, "images_seen": 6400, "fd": 90.0},
               {"train_seconds": 12.0, "step": 100, "images_seen": 12800, "fd": 50.0}])
    write_csv(root / "peer_ddpm" / "loss.csv", ["step", "train_seconds", "loss"],
              [{"step": s, "train_seconds": s * 0.12, "loss": 1.0 / s} for s in range(10, 101, 10)])
    (root / "peer_ddpm" / "result.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3",
                                                                "fd_label": "fd-cifar10-resnet9"}))
    rows = [{"step": s - 1, "train/rec_loss": 0.3 / s} for s in range(10, 401, 10)]
    rows += [{"step": s, "val/psnr": 20 + s / 100, "val/ssim": 0.6 + s / 4000} for s in (99, 199, 299, 399)]
    write_csv(root / "autoencoder" / "ae-f4" / "csv" / "metrics.csv", ["step", "train/rec_loss", "val/psnr", "val/ssim"],
              rows)
    (root / "results").mkdir()
    (root / "results" / "ae-f4-eval.json").write_text(json.dumps(
        {"metrics": {"rfd-cifar10-resnet9@5000": 3.5, "psnr@5000": 24.1, "ssim@5000": 0.8}}))
    (root / "extractor").mkdir()
    (root / "extractor" / "result.json").write_text(json.dumps({"fd_heldout_vs_train@5000": 2.42}))


def test_plots_and_summary_from_fake_results(plot, tmp_path, capsys):
    fake_results(tmp_path / "r")
    summary = plot.main(["--root", str(tmp_path / "r"), "--out", str(tmp_path / "plots")])
    for name in ("fd_vs_train_seconds.png", "losses.png", "stage1_val.png", "summary.json"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000, name
    runs = summary["stage2"]
    assert set(runs) == {"pixel", "ldm-f4", "peer_ddpm"}  # ldm-f2 is missing: skipped, not an error
    assert runs["pixel"]["final"] == {"train_seconds": pytest.approx(23.01), "step": 230, "fd": 35.0}
    assert runs["ldm-f4"]["best"]["fd"] == 19.0 and runs["ldm-f4"]["evaluations"] == 5
    assert runs["peer_ddpm"]["final"]["fd"] == 50.0 and runs["pixel"]["images_per_sec_median"] == pytest.approx(1280)
    assert summary["floor"] == {"metric": "fd_heldout_vs_train@5000", "value": 2.42} and not summary["mixed_devices"]
    assert summary["stage1"]["ae-f4"]["last_val"]["psnr"] == [399, pytest.approx(23.99)]
    assert summary["stage1"]["ae-f4"]["evaluate"]["psnr@5000"] == 24.1
    out = capsys.readouterr().out
    assert "| pixel space (f=1) | NVIDIA H100 80GB HBM3 | 3 | 35.00 (23 s, 230) |" in out and "WARNING" not in out


def test_loss_rows_get_seconds_from_clock_readings_not_repeated_values(plot, tmp_path):
    rows = framework_rows(0.1, {100: 80.0}, 120)
    path = tmp_path / "metrics.csv"
    write_csv(path, FRAMEWORK_COLUMNS, rows)
    run = plot.framework_run(path)
    seconds = {p["step"]: p["train_seconds"] for p in run["loss"]}
    # Readings: (49, 5.0) and (99, 10.0) from the Throughput rows, (100, 10.01) from the FD row. Step 69 repeats
    # 5.0 in the CSV, but lies two fifths of the way from step 49 to 99.
    assert seconds[69] == pytest.approx(5.0 + 5.0 * 20 / 50)
    assert seconds[9] == pytest.approx(5.0 * 9 / 49)  # from 0 s at step 0
    assert 119 not in seconds  # past the last reading: no invented time


def test_mixed_devices_are_flagged(plot, tmp_path, capsys):
    fake_results(tmp_path / "r", second_device="NVIDIA H200")
    summary = plot.main(["--root", str(tmp_path / "r")])
    assert summary["mixed_devices"] and "WARNING: runs on different devices" in capsys.readouterr().out


def test_no_results_is_one_line(plot, tmp_path):
    with pytest.raises(SystemExit, match="no run CSVs"):
        plot.main(["--root", str(tmp_path)])


def test_runs_with_another_batch_size_are_labelled_by_their_preset_and_batch(plot):
    assert plot.run_label("ldm-f2-b1024") == "LDM, KL f=2 (16x16x4), batch 1024"
    assert plot.run_label("pixel") == "pixel space (f=1)"
    assert plot.base_and_batch("ldm-f4") == ("ldm-f4", None)
    assert plot.run_label("my-run") == "my-run"
