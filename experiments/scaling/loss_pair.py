"""Per-step training losses of two runs of the same configuration and seed that differ in one setting (an A/B of
something that must not change the math), side by side: a table of the logged steps and one chart.

    python experiments/scaling/loss_pair.py <a.csv> <b.csv> --labels "<a>" "<b>" --out <chart.png>

Same seed, same data order and the same noise draws: the curves must lie on top of each other. Two runs of one
program on a GPU still differ in the last bits (atomics in backward kernels, autotuned kernel choices), and the
difference grows over the steps, so agreement is to within noise, not to the bit. Needs matplotlib.
"""

import argparse
import csv
from pathlib import Path


def losses(path: Path, key: str = "train/loss") -> dict[int, float]:
    with open(path, newline="") as handle:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(handle) if row.get(key)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--labels", nargs=2, default=["a", "b"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    a, b = losses(args.a), losses(args.b)
    steps = sorted(set(a) & set(b))
    print(f"| step | {args.labels[0]} | {args.labels[1]} | relative difference |\n|---|---|---|---|")
    for step in steps:
        print(f"| {step} | {a[step]:.5f} | {b[step]:.5f} | {abs(a[step] - b[step]) / abs(a[step]):.2%} |")
    mean_a, mean_b = (sum(run[s] for s in steps) / len(steps) for run in (a, b))
    print(f"mean over the {len(steps)} logged steps: {mean_a:.5f} against {mean_b:.5f} "
          f"({abs(mean_a - mean_b) / mean_a:.2%} apart)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, label, style in ((a, args.labels[0], "-"), (b, args.labels[1], "--")):
        ax.plot(steps, [run[s] for s in steps], style, marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss (one batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
