"""Score digit samples with a classifier of the embedded digits: how many read as a digit, and how far their
features are from held-out digits, beside a ladder of known degradations of real digits at the same n.

    PYTHONPATH=src python experiments/quickstart/score.py --extractor outputs/feature_extractors/digits-resnet9/digits-resnet9.pt \\
        --samples before=outputs/sample/quickstart/images after=... --out experiments/quickstart/score.json

- **Confident share**: the fraction of samples whose largest softmax probability is at least ``--confidence``
  (0.9): the classifier reads one digit in them. On real held-out digits it is about 99%.
- **Precision** (Kynkaanniemi et al. 2019, k = 3): the fraction of samples inside the k-NN balls of the held-out
  digits' features. Confidence alone is fooled (the classifier is as sure of pure noise as of a digit: see the
  ladder); precision is not.
- **FD**: the Frechet distance of the samples' features (the classifier's 512-d ``pool`` output) to those of the
  500 held-out digits (``data=digits`` split, never seen by the classifier or the models). It is biased by n, so
  every set is compared with the ladder at its own n.
- **Ladder** (the same n, ``--draws`` random draws of training digits each, mean and range): real digits, a
  3x3 box blur, Gaussian noise (sigma 0.2 of the [-1, 1] range), JPEG quality 50, and pure noise images.

The classifier is ``experiments/feature_extractors/train_classifier.py --data digits`` (see README.md here).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_ldm.data.digits import DigitsDataModule
from lightning_ldm.metrics.features import FeatureExtractorSpec, build_feature_extractor
from lightning_ldm.metrics.frechet import GaussianStatistics, distance_to_reference
from lightning_ldm.metrics.ladder import degrade
from lightning_ldm.metrics.scores import precision_recall


def load_pngs(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))
    if not files:
        raise SystemExit(f"{folder}: no .png files")
    images = [np.array(Image.open(f).convert("L")) for f in files]
    return torch.from_numpy(np.stack(images))[:, None]  # uint8 (N, 1, H, W)


def split_uint8(dm: DigitsDataModule, view) -> torch.Tensor:
    images = torch.stack([view[i]["image"] for i in range(len(view))])
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def read(extractor, images: torch.Tensor, confidence: float) -> dict:
    """Features, and what the classifier's head makes of them."""
    with torch.no_grad():
        features = torch.cat([extractor(chunk.to(extractor.device))["features"] for chunk in images.split(256)])
        net = extractor.net
        probs = (net.head(features) * net.logit_scale).softmax(-1)
    top, label = probs.max(-1)
    return {"features": features, "confident": (top >= confidence).float().mean().item(),
            "classes": torch.bincount(label[top >= confidence], minlength=10).tolist()}


RUNGS = ("real digits", "jpeg q50", "blur 3x3", "noise 0.2", "pure noise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", required=True, help="the classifier bundle (<train_classifier.py --out>/<name>.pt)")
    parser.add_argument("--samples", nargs="+", required=True, help="NAME=FOLDER of png samples")
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = build_feature_extractor(FeatureExtractorSpec(kind="checkpoint", name="digits-resnet9",
                                                             path=args.extractor, feature_layer="pool"), device=device)
    dm = DigitsDataModule()
    dm.setup()
    train, heldout = split_uint8(dm, dm.train_dataset), split_uint8(dm, dm.val_dataset)
    reference_features = read(extractor, heldout, args.confidence)["features"]
    reference = GaussianStatistics.from_features(reference_features)

    def precision(features: torch.Tensor) -> float:
        return precision_recall(features, reference_features)["precision"]

    results = {"extractor": extractor.describe(), "confidence": args.confidence, "reference": "500 held-out digits",
               "samples": {}, "ladder": {}}
    sizes = set()
    for item in args.samples:
        name, folder = item.split("=", 1)
        images = load_pngs(Path(folder))
        scored = read(extractor, images, args.confidence)
        results["samples"][name] = {"folder": folder, "n": len(images), "confident": scored["confident"],
                                    "confident_classes": scored["classes"], "precision": precision(scored["features"]),
                                    "fd": distance_to_reference(reference, scored["features"])}
        sizes.add(len(images))
    generator = torch.Generator().manual_seed(0)
    for n in sorted(sizes):
        rows = {}
        for rung in RUNGS:
            fds, shares, precisions = [], [], []
            for _ in range(args.draws):
                draw = train[torch.randperm(len(train), generator=generator)[:n]]
                scored = read(extractor, degrade(draw, rung, generator), args.confidence)
                fds.append(distance_to_reference(reference, scored["features"]))
                shares.append(scored["confident"])
                precisions.append(precision(scored["features"]))
            rows[rung] = {"fd_mean": float(np.mean(fds)), "fd_min": min(fds), "fd_max": max(fds),
                          "confident_mean": float(np.mean(shares)), "precision_mean": float(np.mean(precisions))}
        results["ladder"][str(n)] = rows

    for n in sorted(sizes):
        print(f"\nn = {n:<20} confident  precision        FD (ladder: mean [min, max] of {args.draws} draws)")
        for name, row in results["samples"].items():
            if row["n"] == n:
                print(f"  {name:<22} {row['confident']:8.1%} {row['precision']:10.1%} {row['fd']:10.1f}")
        for rung, row in results["ladder"][str(n)].items():
            print(f"  [{rung}]{'':<{20 - len(rung)}} {row['confident_mean']:8.1%} {row['precision_mean']:10.1%} "
                  f"{row['fd_mean']:10.1f} [{row['fd_min']:.1f}, {row['fd_max']:.1f}]")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
