"""Loss curves of the same run on 1 GPU (global batch 1 x 128) and on 2 GPUs with DDP (2 x 64), one chart per stage.

    python experiments/scaling/compare_curves.py <folder with s1-1gpu.csv, s1-2gpu.csv, s2-1gpu.csv, s2-2gpu.csv> \
        [--out <folder>]

The two runs see different random draws (noise, timesteps, data order per rank), so their per-batch losses differ;
what must agree is the curve. Prints, per stage and metric, the mean over windows of batches for both runs and
their relative difference; writes ``curves_1gpu_vs_2gpu.png`` and ``curves_1gpu_vs_2gpu.md``. Needs matplotlib.
"""

import argparse
import csv
from pathlib import Path

METRICS = {"s1": ["train/rec_loss", "val/rec_loss", "val/psnr"], "s2": ["train/loss", "val/loss"]}
TITLES = {"s1": "stage 1 (KL f=4 autoencoder)", "s2": "stage 2 (unet=small on its latents)"}


def series(path: Path, key: str) -> list[tuple[int, float]]:
    with open(path, newline="") as handle:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(handle) if row.get(key)]


def window_means(points: list[tuple[int, float]], width: int) -> dict[int, float]:
    sums: dict[int, list[float]] = {}
    for step, value in points:
        sums.setdefault(step // width, []).append(value)
    return {w * width: sum(v) / len(v) for w, v in sorted(sums.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| stage | metric | batches | 1 GPU (1 x 128) | 2 GPUs (2 x 64) | difference |", "|---|---|---|---|---|---|"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for axis, (stage, keys) in zip(axes, METRICS.items()):
        one, two = args.root / f"{stage}-1gpu.csv", args.root / f"{stage}-2gpu.csv"
        if not (one.is_file() and two.is_file()):
            continue
        key = keys[0]
        for path, label, style in [(one, "1 GPU, batch 128", "-"), (two, "2 GPUs (DDP), batch 2 x 64", "--")]:
            points = series(path, key)
            axis.plot([s for s, _ in points], [v for _, v in points], style, label=label)
        axis.set(title=TITLES[stage], xlabel="batch", ylabel=key, yscale="log")
        axis.grid(alpha=0.3)
        axis.legend()
        for key in keys:
            a, b = series(one, key), series(two, key)
            if not (a and b):
                continue
            width = 100 if key.startswith("train/") else 1
            ma, mb = window_means(a, width), window_means(b, width)
            for start in sorted(set(ma) & set(mb)):
                span = f"{start}-{start + width - 1}" if width > 1 else str(start)
                diff = (mb[start] - ma[start]) / abs(ma[start])
                lines.append(f"| {stage} | {key} | {span} | {ma[start]:.4g} | {mb[start]:.4g} | {diff:+.1%} |")
    figure.tight_layout()
    figure.savefig(out / "curves_1gpu_vs_2gpu.png", dpi=120)
    (out / "curves_1gpu_vs_2gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'curves_1gpu_vs_2gpu.png'}")


if __name__ == "__main__":
    main()
