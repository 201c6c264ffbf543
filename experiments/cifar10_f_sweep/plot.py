"""Plots and a summary of the CIFAR-10 f sweep (issue 7) from the CSVs that come back from the GPU machine.

    python experiments/cifar10_f_sweep/plot.py --root <folder with the extracted call*.tgz> [--out <folder>]

Reads, under ``--root`` (the layout ``run.sh`` writes, every part optional):

- ``diffusion/<run>/csv/metrics.csv`` (``pixel``, ``ldm-f2``, ``ldm-f4``, and variants such as ``ldm-f2-b1024``
  for batch 1024): the framework's CSV logger (``val/fd-<name>@<n>`` with
  ``perf/train_seconds`` at every FD evaluation, ``train/loss`` every 10 batches, ``perf/train_seconds`` every 50)
- ``peer_ddpm/{curve,loss}.csv``: the diffusers peer (``train_seconds, step, images_seen, fd``; ``step,
  train_seconds, loss``)
- ``autoencoder/<run>/csv/metrics.csv`` (``ae-f2``, ``ae-f4`` or another ``AE_NAME``): stage 1 (``val/psnr``,
  ``val/ssim``, ``train/rec_loss``)
- ``results/ae-*-eval.json`` (``stage=evaluate`` of each autoencoder export), ``extractor/result.json``
- ``*/run_info.json`` and ``peer_ddpm/result.json`` for the device of each run

Writes to ``--out`` (default: ``--root``): ``fd_vs_train_seconds.png`` (FD of every stage-2 run and the peer
against training seconds, one chart), ``losses.png`` (stage-2 training loss against training seconds, stage-1
reconstruction loss against batches), ``stage1_val.png`` (validation PSNR and SSIM against batches) and
``summary.json``; prints a Markdown table. Needs matplotlib and numpy.
"""

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

FD_KEY = re.compile(r"^val/(fid|fd-[^@]+)@(\d+)$")
STAGE2 = [("pixel", "pixel space (f=1)"), ("ldm-f2", "LDM, KL f=2 (16x16x4)"), ("ldm-f4", "LDM, KL f=4 (8x8x4)")]
BATCH_SUFFIX = re.compile(r"^(.+)-b(\d+)$")
STAGE1 = [("ae-f2", "KL f=2"), ("ae-f4", "KL f=4")]
PEER = ("peer_ddpm", "diffusers DDPM (Ho et al.), pixel space")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(value) -> Optional[float]:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def seconds_by_step(rows: list[dict]) -> list[tuple[float, float]]:
    """(step, training seconds) readings, increasing. Lightning repeats a callback's last logged value on later
    rows, so only the first row of each distinct ``perf/train_seconds`` value is a reading at that step."""
    readings, seen = [], set()
    for row in rows:
        seconds, step = number(row.get("perf/train_seconds")), number(row.get("step"))
        if seconds is None or step is None or seconds in seen:
            continue
        seen.add(seconds)
        readings.append((step, seconds))
    readings.sort()
    monotone = []
    for step, seconds in readings:  # drop a stale repeat that would make the clock run backwards
        if not monotone or seconds >= monotone[-1][1]:
            monotone.append((step, seconds))
    return monotone


def interpolate(step: float, readings: list[tuple[float, float]]) -> Optional[float]:
    """Training seconds at ``step``, linear between readings (and from 0 s at step 0); None past the last one."""
    points = [(0.0, 0.0)] + readings
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    return None


def framework_run(metrics_csv: Path) -> dict:
    rows = read_csv(metrics_csv)
    keys = [k for k in (rows[0].keys() if rows else []) if FD_KEY.match(k)]
    fd_key = keys[0] if keys else None
    readings = seconds_by_step(rows)
    fd = []
    if fd_key:
        for row in rows:
            value, seconds, step = number(row.get(fd_key)), number(row.get("perf/train_seconds")), number(row.get("step"))
            if value is not None and seconds is not None:
                fd.append({"train_seconds": seconds, "step": step, "fd": value})
    fd.sort(key=lambda p: p["train_seconds"])
    loss = []
    for row in rows:
        value, step = number(row.get("train/loss")), number(row.get("step"))
        if value is None or step is None:
            continue
        seconds = interpolate(step, readings)
        if seconds is not None:
            loss.append({"train_seconds": seconds, "step": step, "loss": value})
    rates = [number(r.get("perf/images_per_sec")) for r in rows if number(r.get("perf/images_per_sec"))]
    return {"fd_key": fd_key, "fd": fd, "loss": loss, "images_per_sec": rates}


def peer_run(folder: Path) -> dict:
    fd, loss = [], []
    if (folder / "curve.csv").is_file():
        for row in read_csv(folder / "curve.csv"):
            value, seconds = number(row.get("fd")), number(row.get("train_seconds"))
            if value is not None and seconds is not None:
                fd.append({"train_seconds": seconds, "step": number(row.get("step")), "fd": value})
    if (folder / "loss.csv").is_file():
        for row in read_csv(folder / "loss.csv"):
            value, seconds = number(row.get("loss")), number(row.get("train_seconds"))
            if value is not None and seconds is not None:
                loss.append({"train_seconds": seconds, "step": number(row.get("step")), "loss": value})
    result = folder / "result.json"
    info = json.loads(result.read_text()) if result.is_file() else {}
    return {"fd_key": info.get("fd_label"), "fd": sorted(fd, key=lambda p: p["train_seconds"]), "loss": loss,
            "images_per_sec": [], "device": info.get("device")}


def stage1_run(metrics_csv: Path) -> dict:
    rows = read_csv(metrics_csv)
    val = {"psnr": [], "ssim": []}
    rec = []
    for row in rows:
        step = number(row.get("step"))
        for key in val:
            value = number(row.get(f"val/{key}"))
            if value is not None and step is not None:
                val[key].append((step, value))
        value = number(row.get("train/rec_loss"))
        if value is not None and step is not None:
            rec.append((step, value))
    return {"val": val, "rec_loss": rec}


def device_of(run_dir: Path) -> Optional[str]:
    info = run_dir / "run_info.json"
    if not info.is_file():
        return None
    gpu = json.loads(info.read_text()).get("versions", {}).get("gpu")  # torch.cuda.get_device_name(0), or "none"
    return str(gpu) if gpu and gpu != "none" else None


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def base_and_batch(name: str) -> tuple[str, Optional[int]]:
    """"ldm-f2-b1024" -> ("ldm-f2", 1024): a preset run with another batch size."""
    match = BATCH_SUFFIX.match(name)
    return (match[1], int(match[2])) if match else (name, None)


def run_label(name: str) -> str:
    base, batch = base_and_batch(name)
    label = dict(STAGE2).get(base, base)
    return f"{label}, batch {batch}" if batch else label


def collect(root: Path) -> dict:
    runs = {}
    order = [name for name, _ in STAGE2]
    folders = sorted((root / "diffusion").glob("*/csv/metrics.csv"),
                     key=lambda p: (order.index(base_and_batch(p.parents[1].name)[0])
                                    if base_and_batch(p.parents[1].name)[0] in order else len(order), p.parents[1].name))
    for csv_path in folders:
        name = csv_path.parents[1].name
        runs[name] = {"label": run_label(name), **framework_run(csv_path), "device": device_of(csv_path.parents[1])}
    if (root / PEER[0] / "curve.csv").is_file() or (root / PEER[0] / "loss.csv").is_file():
        runs[PEER[0]] = {"label": PEER[1], **peer_run(root / PEER[0])}
    stage1 = {}
    known = [name for name, _ in STAGE1]
    others = sorted(p.parents[1].name for p in (root / "autoencoder").glob("*/csv/metrics.csv")
                    if p.parents[1].name not in known)
    for name, label in [*STAGE1, *((name, name) for name in others)]:
        csv_path = root / "autoencoder" / name / "csv" / "metrics.csv"
        if csv_path.is_file():
            stage1[name] = {"label": label, **stage1_run(csv_path), "device": device_of(root / "autoencoder" / name)}
        report = root / "results" / f"{name}-eval.json"
        if report.is_file():
            stage1.setdefault(name, {"label": label})["evaluate"] = json.loads(report.read_text()).get("metrics")
    extractor = root / "extractor" / "result.json"
    floor = None
    if extractor.is_file():
        info = json.loads(extractor.read_text())
        floor = next(({"metric": k, "value": v} for k, v in info.items() if k.startswith("fd_heldout_vs_train@")), None)
    return {"stage2": runs, "stage1": stage1, "floor": floor}


def summarise(data: dict) -> dict:
    rows = {}
    for name, run in data["stage2"].items():
        fd = run["fd"]
        best = min(fd, key=lambda p: p["fd"]) if fd else None
        rates = run.get("images_per_sec") or []
        rows[name] = {
            "label": run["label"], "metric": run.get("fd_key"), "device": run.get("device"),
            "final": fd[-1] if fd else None, "best": best, "evaluations": len(fd),
            "images_per_sec_median": sorted(rates)[len(rates) // 2] if rates else None,
        }
    stage1 = {name: {"label": run["label"], "device": run.get("device"),
                     "last_val": {k: list(v[-1]) for k, v in run.get("val", {}).items() if v},
                     "evaluate": run.get("evaluate")} for name, run in data["stage1"].items()}
    devices = {r["device"] for r in rows.values() if r["device"]} | {r["device"] for r in stage1.values() if r["device"]}
    return {"stage2": rows, "stage1": stage1, "floor": data["floor"], "devices": sorted(devices),
            "mixed_devices": len(devices) > 1}


def plot(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colours = {"pixel": "tab:red", "ldm-f2": "tab:blue", "ldm-f4": "tab:green", "peer_ddpm": "tab:gray",
               "ae-f2": "tab:blue", "ae-f4": "tab:green"}
    spare = iter(["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black"] * 4)

    def colour(name: str) -> str:  # the fixed colour of a known run, else the next unused one (kept per name)
        if name not in colours:
            colours[name] = next(spare)
        return colours[name]

    runs = data["stage2"]
    labels = {r.get("fd_key") for r in runs.values() if r.get("fd_key")}

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    def style(name: str) -> dict:  # one colour per space, a line style per batch size
        base, batch = base_and_batch(name)
        dashes = {None: "-", 128: "-", 256: "-.", 512: "--", 1024: ":"}
        return {"color": colour(base), "ls": dashes.get(batch, "-.")}

    for name, run in runs.items():
        if run["fd"]:
            ax.plot([p["train_seconds"] for p in run["fd"]], [p["fd"] for p in run["fd"]], marker="o", ms=3.5,
                    **style(name), label=run["label"] + (f" [{run['device']}]" if run.get("device") else ""))
    if data["floor"]:
        key, value = data["floor"]["metric"], data["floor"]["value"]
        ax.axhline(value, color="black", ls="--", lw=0.8,
                   label=f"real: training images vs held-out ({key.split('@')[1]} held-out) {value:.2f}")
    ax.set_xlabel("training seconds (validation and FD evaluations excluded)")
    ax.set_ylabel(" / ".join(sorted(k.replace("val/", "") for k in labels if k)) + " vs held-out images"
                  if labels else "FD vs held-out images")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("CIFAR-10: FD against training time, equal budgets")
    if ax.has_data():
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "fd_vs_train_seconds.png")
    fig.savefig(written[-1], dpi=130)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs.items():
        if run["loss"]:
            seconds = [p["train_seconds"] for p in run["loss"]]
            left.plot(seconds, smooth([p["loss"] for p in run["loss"]], 10), lw=1, label=run["label"], **style(name))
    left.set_xlabel("training seconds")
    left.set_ylabel("training loss (eps MSE, running mean of 10 logs)")
    left.set_yscale("log")
    left.set_title("stage 2 (each in its own space: not comparable across spaces)", fontsize=9)
    for name, run in data["stage1"].items():
        if run.get("rec_loss"):
            steps, values = zip(*run["rec_loss"])
            right.plot(steps, smooth(list(values), 10), color=colour(name), lw=1, label=run["label"])
    right.set_xlabel("batches")
    right.set_ylabel("stage-1 training reconstruction loss")
    right.set_title("stage 1", fontsize=9)
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "losses.png")
    fig.savefig(written[-1], dpi=130)
    plt.close(fig)

    if data["stage1"]:
        fig, (psnr, ssim) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, run in data["stage1"].items():
            for axis, key in ((psnr, "psnr"), (ssim, "ssim")):
                points = run.get("val", {}).get(key) or []
                if points:
                    axis.plot(*zip(*points), "o-", ms=3.5, color=colour(name), label=run["label"])
        psnr.set_ylabel("validation PSNR (dB)")
        ssim.set_ylabel("validation SSIM")
        for axis in (psnr, ssim):
            axis.set_xlabel("batches")
            axis.grid(True, alpha=0.3)
            if axis.has_data():
                axis.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "stage1_val.png")
        fig.savefig(written[-1], dpi=130)
        plt.close(fig)
    return written


def table(summary: dict) -> str:
    lines = ["| run | device | FD evaluations | final FD (train s, batch) | best FD (train s) | images/s (median) |",
             "|---|---|---|---|---|---|"]
    for row in summary["stage2"].values():
        final, best = row["final"], row["best"]
        final_text = f"{final['fd']:.2f} ({final['train_seconds']:.0f} s, {final['step']:.0f})" if final else "-"
        best_text = f"{best['fd']:.2f} ({best['train_seconds']:.0f} s)" if best else "-"
        rate = f"{row['images_per_sec_median']:.0f}" if row["images_per_sec_median"] else "-"
        lines.append(f"| {row['label']} | {row['device'] or '-'} | {row['evaluations']} | {final_text} | {best_text} "
                     f"| {rate} |")
    for row in summary["stage1"].values():
        last = ", ".join(f"{k} {v[1]:.3f} at {v[0]:.0f}" for k, v in row["last_val"].items())
        evaluated = ", ".join(f"{k} {v:.4g}" for k, v in (row.get("evaluate") or {}).items())
        lines.append(f"| stage 1 {row['label']} | {row['device'] or '-'} | - | val: {last or '-'} | "
                     f"{evaluated or '-'} | - |")
    if summary["mixed_devices"]:
        lines.append(f"\nWARNING: runs on different devices ({', '.join(summary['devices'])}): training seconds are "
                     "not comparable across them")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="folder holding the extracted results")
    parser.add_argument("--out", type=Path, help="where the PNGs and summary.json go (default: --root)")
    args = parser.parse_args(argv)
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    data = collect(args.root)
    if not data["stage2"] and not data["stage1"]:
        sys.exit(f"error: no run CSVs under {args.root} (expected diffusion/<run>/csv/metrics.csv, peer_ddpm/, ...)")
    summary = summarise(data)
    summary["plots"] = [str(p) for p in plot(data, out)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    print("wrote " + ", ".join(summary["plots"]) + f", {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
