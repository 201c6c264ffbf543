"""Weak-scaling table from the runs' CSV logs: images/s (median of the logged windows after the first, which holds
torch.compile and cuDNN warm-up), per GPU, efficiency = images/s on N GPUs / (N x images/s on 1 GPU), peak memory.

    python experiments/scaling/summarize.py <outputs root>  # expects <stage>/<model>-<variant>-<N>gpu/csv/metrics.csv
    python experiments/scaling/summarize.py <folder>        # or the flat <model>-<variant>-<N>gpu.csv of run.sh
    python experiments/scaling/summarize.py <root> --fastest ldm4 2  # the tag of the fastest ldm4 DDP run on 2 GPUs,
                                                                     # as run.sh's WEAK_RUNS writes it ("split/" or "")

Efficiency is given against the same variant on 1 GPU and against the fastest 1-GPU run of the same model (e.g.
ldm4-ddp-2gpu against ldm4-single-1gpu, the UNet compiled whole without DDP): the honest baseline.
"""

import csv
import re
import statistics
import sys
from pathlib import Path


def windows(metrics_csv: Path) -> tuple[list[float], float]:
    rates, memory = [], 0.0
    for row in csv.DictReader(metrics_csv.open()):
        if row.get("perf/images_per_sec"):
            rates.append(float(row["perf/images_per_sec"]))
        if row.get("perf/peak_memory_gb"):
            memory = max(memory, float(row["perf/peak_memory_gb"]))
    return rates, memory


def collect(root: Path) -> dict[str, dict[int, tuple[float, float, int]]]:
    """{run name without its GPU count: {N: (median images/s, peak GB, windows)}}"""
    runs: dict[str, dict[int, tuple[float, float, int]]] = {}
    found = {m.parents[1].name: m for m in root.glob("*/*/csv/metrics.csv")} | {m.stem: m for m in root.glob("*.csv")}
    for run_name, metrics in sorted(found.items()):
        match = re.fullmatch(r"(.+)-(\d+)gpu", run_name)
        if not match:
            continue
        rates, memory = windows(metrics)
        if len(rates) >= 2:
            runs.setdefault(match[1], {})[int(match[2])] = (statistics.median(rates[1:]), memory, len(rates) - 1)
    return runs


def fastest_tag(runs: dict[str, dict[int, tuple[float, float, int]]], model: str, n: int) -> str:
    """The WEAK_RUNS tag ("<tag>/", or "" untagged) of the fastest <model> DDP run on n GPUs (default: untagged)."""
    rates = {name: by_n[n][0] for name, by_n in runs.items() if n in by_n and name.endswith(f"{model}-ddp")}
    if not rates:
        return ""
    tag = max(rates, key=rates.get).removesuffix(f"{model}-ddp").removesuffix("-")
    return f"{tag}/" if tag else ""


def main(root: Path) -> None:
    runs = collect(root)

    def model(name: str) -> str:  # "[<tag>-]<model>-<variant>" -> "<model>"
        return name.split("-")[-2]

    best: dict[str, float] = {}
    for name, by_n in runs.items():
        if 1 in by_n:
            best[model(name)] = max(best.get(model(name), 0.0), by_n[1][0])
    print("| run | GPUs | images/s | images/s per GPU | efficiency | vs fastest 1-GPU run | peak GiB/GPU | windows |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_n in runs.items():
        base = by_n.get(1, (None,))[0]
        for n, (rate, memory, count) in sorted(by_n.items()):
            efficiency = f"{rate / (n * base):.1%}" if base else "-"
            against_best = f"{rate / (n * best[model(name)]):.1%}" if model(name) in best else "-"
            print(f"| {name} | {n} | {rate:.1f} | {rate / n:.1f} | {efficiency} | {against_best} | {memory:.1f} | "
                  f"{count} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[2] == "--fastest":
        print(fastest_tag(collect(Path(sys.argv[1])), sys.argv[3], int(sys.argv[4])))
    else:
        main(Path(sys.argv[1]))
