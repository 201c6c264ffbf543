"""The table of parts 2 and 3: every side at equal total GPU time, per seed, then mean and range over seeds.

    python experiments/cifar10_fair/summarize_fair.py outputs/fair > part2-table.md

Reads ``budget-s<seed>.json`` (run_part2.sh PHASE=prep), the in-run FD curves (``diffusion/<run>/csv/metrics.csv``
of ours, ``peer-s<seed>/curve.csv`` of the peer: classifier seed 0, every FD_EVERY_S of training time) and
``ladder-part2.json`` (the final 5,000 samples of every run rescored with both classifiers, beside the ladder).
"""

import csv
import json
import re
import statistics
import sys
from pathlib import Path

FD_KEY = re.compile(r"^val/fd-[^@]+@\d+$")
ROWS = (("f2-total", "LDM f=2, 6 min total (stage 1 + latent cache + stage 2)"),
        ("f2-free", "LDM f=2, autoencoder given for free (360 s of stage 2; stage 1 not counted)"),
        ("pixel", "ours in pixel space, 360 s"),
        ("peer", "diffusers DDPM peer (tuned), 360 s"))


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def final_in_run_fd(work: Path, run: str):
    if run.startswith("peer"):
        path = work / run / "curve.csv"
        rows = list(csv.DictReader(open(path))) if path.is_file() else []
        values = [(number(r["train_seconds"]), number(r["fd"])) for r in rows if number(r.get("fd")) is not None]
    else:
        path = work / "diffusion" / run / "csv" / "metrics.csv"
        rows = list(csv.DictReader(open(path))) if path.is_file() else []
        key = next((k for k in (rows[0] if rows else {}) if FD_KEY.match(k)), None)
        values = [(number(r.get("perf/train_seconds")), number(r[key])) for r in rows
                  if key and number(r.get(key)) is not None]
    values = [v for v in values if v[0] is not None]
    return max(values)[1] if values else None


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


def main(folder: str) -> None:
    work = Path(folder)
    ladder_path = work / "ladder-part2.json"
    ladder = json.loads(ladder_path.read_text()) if ladder_path.is_file() else {"samples": {}, "ladder": {}}
    seeds = sorted(int(p.stem.split("-s")[1]) for p in work.glob("budget-s*.json"))
    for seed in seeds:
        b = json.loads((work / f"budget-s{seed}.json").read_text())
        print(f"seed {seed}: {b['stage1_train_seconds']:.1f} s stage 1 + {b['latent_cache_seconds'] or 0:.1f} s latent "
              f"cache + {b['stage2_train_seconds']:.1f} s stage 2 = {b['total_seconds']:.0f} s (not counted: "
              f"{b['not_counted']})")
    print("\n| run | seeds | FD s0 in-run, final | FD s0 rescored | FD s1 rescored | FD s0 / peer's (same seed) | "
          "blank | saturated | clipped values |")
    print("|---|---|---|---|---|---|---|---|---|")
    peer_s0 = {s: ladder["samples"].get(f"peer-s{s}", {}).get("fd", {}).get("s0") for s in seeds}
    for prefix, label in ROWS:
        runs = {s: f"{prefix}-s{s}" for s in seeds}
        sampled = {s: ladder["samples"].get(r, {}) for s, r in runs.items()}
        ratios = [sampled[s]["fd"]["s0"] / peer_s0[s] for s in seeds
                  if sampled[s].get("fd") and peer_s0.get(s)]
        share = lambda key: spread([100 * sampled[s][key] for s in seeds if key in sampled[s]])  # noqa: E731
        print(f"| {label} | {len(seeds)} | {spread([final_in_run_fd(work, r) for r in runs.values()])} | "
              f"{spread([sampled[s].get('fd', {}).get('s0') for s in seeds])} | "
              f"{spread([sampled[s].get('fd', {}).get('s1') for s in seeds])} | "
              f"{'-' if not ratios else f'{statistics.mean(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]'} | "
              f"{share('blank_share')}% | {share('saturated_share')}% | {share('clipped_share')}% |")
    rungs = ladder["ladder"].get("5000", {})
    if rungs:
        print("\nLadder at n = 5,000 (training images against the held-out reference; mean [min, max] of the draws):\n")
        print("| rung | FD s0 | FD s1 |")
        print("|---|---|---|")
        for rung, row in rungs.items():
            print(f"| {rung} | " + " | ".join(f"{row['fd'][k]['mean']:.1f} [{row['fd'][k]['min']:.1f}, "
                                             f"{row['fd'][k]['max']:.1f}]" for k in ("s0", "s1")) + " |")
    print("\nMean [min, max] over seeds. FD against the 5,000 held-out images, n = 5,000 samples (fixed seeds 0-4999),"
          " classifier seeds s0 and s1; the ratio divides each seed's FD by the peer's of the same seed.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/fair")
