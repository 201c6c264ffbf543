"""The numbers of one experiments/digits/run.sh run, as a few lines of text (run.sh calls it at the end).

    python experiments/digits/summary.py <WORK>      # e.g. outputs/digits, or an unpacked digits.tgz
"""

import csv
import json
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as file:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(file)]


def last(table: list[dict], key: str):
    values = [(int(r.get("step", -1)), float(r[key])) for r in table if key in r]
    return values[-1] if values else None


def main(work: Path) -> None:
    extractor = work / "extractor" / "result.json"
    if extractor.is_file():
        r = json.loads(extractor.read_text())
        floor = {k: round(v, 3) for k, v in r.items() if k.startswith("fd_heldout_vs_train")}
        print(f"extractor {r.get('metric_label')}: held-out accuracy {r['heldout_accuracy']:.4f} "
              f"({r.get('heldout_images')} images), {r.get('epochs')} epochs, train {r.get('train_seconds', 0):.1f} s, "
              f"{r.get('device')}, floor {floor}, dry_run={r.get('dry_run')}")
    else:
        print("extractor: no result.json")

    ae = rows(work / "autoencoder" / "digits-ae" / "csv" / "metrics.csv")
    if ae:
        steps = max(int(r["step"]) for r in ae if "train/rec_loss" in r)  # steps of training rows count from 0
        psnr, ssim = last(ae, "val/psnr"), last(ae, "val/ssim")
        print(f"stage 1: last training row at batch {steps + 1}; last validation PSNR {psnr[1]:.2f} dB, SSIM {ssim[1]:.3f} "
              f"(batch {psnr[0] + 1})" if psnr and ssim else f"stage 1: {steps + 1} batches, no validation logged")
    evaluation = work / "results" / "ae-eval.json"
    if evaluation.is_file():
        r = json.loads(evaluation.read_text())
        print("stage 1 evaluate (held-out): " + ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items()))

    ldm = rows(work / "diffusion" / "digits-ldm" / "csv" / "metrics.csv")
    if ldm:
        fd_key = next((k for r in ldm for k in r if k.startswith("val/fd-") and not k.endswith("_best")), None)
        loss = last(ldm, "train/loss")  # steps of training rows count from 0; FD rows give batches completed
        print(f"stage 2: train/loss {loss[1]:.4f} at batch {loss[0] + 1} (last training row)" if loss else "stage 2: no loss")
        if fd_key:
            for r in ldm:
                if fd_key in r:
                    print(f"  {fd_key} = {float(r[fd_key]):.3f} at batch {r['step']}, "
                          f"{float(r.get('perf/train_seconds', 'nan')):.1f} s of training")
    grid = work / "sample" / "digits-samples" / "grid.png"
    print(f"samples: {grid if grid.is_file() else 'no grid.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/digits"))
