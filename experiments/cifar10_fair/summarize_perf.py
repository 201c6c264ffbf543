"""Median and range of the step ratios of ``run_part5.sh``: ours against each peer, repeat by repeat.

    python experiments/cifar10_fair/summarize_perf.py outputs/fair/part5 > summary.md

Each ``[call<c>-]<group>-<net>-r<k>.json`` is one ``peers.py`` process (one variant). Repeat k of ours is paired
with repeat k of each peer of the same call (they ran next to each other); a repeat without its partner is listed
but not paired. MFU is given twice, each named: against the bf16 8192^3 matmul
that the same process measured, and against the datasheet's dense bf16 peak of the card (no sparsity).
"""

import json
import re
import statistics
import sys
from pathlib import Path

# Dense BF16 tensor-core peak, without sparsity (NVIDIA datasheets: H100 SXM5 and H200 SXM, 989.4 TFLOP/s each;
# 1,979 TFLOP/s is the figure with 2:4 sparsity).
DATASHEET_TFLOPS = {"H100": 989.4, "H200": 989.4}


def datasheet(device: str):
    for key, value in DATASHEET_TFLOPS.items():
        if key in device:
            return value
    return None


def spread(values, percent=False):
    values = [100 * v if percent else v for v in values if v is not None]
    if not values:
        return "-"
    unit, digits = ("%", 1) if percent else ("", 3)
    return f"{statistics.median(values):.{digits}f}{unit} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def main(folder: str) -> None:
    runs = {}
    for path in sorted(Path(folder).glob("*-r*.json")):
        m = re.fullmatch(r"(?:(call\d+)-)?(unet|ae)-(.+)-r(\d+)", path.stem)
        if not m:
            continue
        data = json.loads(path.read_text())
        ok = [r for r in data["results"] if r["status"] == "ok"]
        if not ok:
            continue
        r, meta = ok[0], data["meta"]
        peak = datasheet(meta.get("device", ""))
        runs[(m[2], m[3], f"{m[1]} r{m[4]}" if m[1] else f"r{m[4]}")] = {
            "img_s": r["img_per_s"], "ms": r["ms_per_step"], "tflops": r["tflop_per_s"],
            "gflop_img": r["gflop_per_img"], "mfu_matmul": r["mfu"], "matmul": meta.get("bf16_matmul_tflops"),
            "mfu_datasheet": r["tflop_per_s"] / peak if peak and r["tflop_per_s"] else None,
            "mfu_peer_flops": r.get("mfu_peer_flops"), "peak_gib": r["peak_gib"], "warmup_s": r["warmup_s"],
            "device": meta.get("device"), "torch": meta.get("torch"), "diffusers": meta.get("diffusers"),
            "step_ms_min": min(r["step_ms_all"]), "step_ms_max": max(r["step_ms_all"])}
    if not runs:
        print("no results")
        return
    devices = sorted({v["device"] for v in runs.values()})
    any_run = next(iter(runs.values()))
    print(f"device {', '.join(devices)}; torch {any_run['torch']}, diffusers {any_run['diffusers']}; datasheet dense "
          f"bf16 peak {datasheet(devices[0])} TFLOP/s")
    for group in ("unet", "ae"):
        nets = sorted({n for g, n, _ in runs if g == group})
        if not nets:
            continue
        print(f"\n### {group}: every process (median of 20 timed steps after 3 warm-up)\n")
        print("| variant | repeat | images/s | ms/step (median; min-max of the 20) | TFLOP/s | MFU vs measured matmul "
              "| MFU vs datasheet | matmul TFLOP/s | peak GiB | warm-up s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for net in nets:
            for (g, n, k), v in sorted(runs.items()):
                if g == group and n == net:
                    print(f"| {net} | {k} | {v['img_s']:.1f} | {v['ms']:.2f} ({v['step_ms_min']:.2f}-"
                          f"{v['step_ms_max']:.2f}) | {v['tflops']:.1f} | {100 * v['mfu_matmul']:.1f}% | "
                          f"{100 * v['mfu_datasheet']:.1f}% | {v['matmul']:.0f} | {v['peak_gib']:.2f} | "
                          f"{v['warmup_s']:.1f} |")
        ours = {k: v for (g, n, k), v in runs.items() if g == group and n == "ours"}
        print(f"\n### {group}: ours against each peer, paired by repeat; median [min, max]\n")
        print("| peer | repeats | ours / peer images/s, per repeat | ratio median [range] | ours MFU vs matmul "
              "| ours MFU vs datasheet | peer MFU vs matmul | peer MFU vs datasheet |")
        print("|---|---|---|---|---|---|---|---|")
        for net in nets:
            if net == "ours":
                continue
            peer = {k: v for (g, n, k), v in runs.items() if g == group and n == net}
            pairs = sorted(set(ours) & set(peer))
            ratios = [ours[k]["img_s"] / peer[k]["img_s"] for k in pairs]
            print(f"| {net} | {len(pairs)} | {', '.join(f'{x:.3f}' for x in ratios)} | {spread(ratios)} | "
                  f"{spread([ours[k]['mfu_matmul'] for k in pairs], True)} | "
                  f"{spread([ours[k]['mfu_datasheet'] for k in pairs], True)} | "
                  f"{spread([peer[k]['mfu_matmul'] for k in pairs], True)} | "
                  f"{spread([peer[k]['mfu_datasheet'] for k in pairs], True)} |")
    print("\nRatio: images/s of ours over the peer's, same repeat. MFU: model FLOPs per second (FlopCounterMode on "
          "each "
          "implementation's own eager step, 2 per multiply-add) over the named peak.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/fair/part5")
