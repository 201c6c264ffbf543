"""A readable scale for the CIFAR-10 classifier's Frechet distance: known degradations of real images scored with
each extractor, beside generated samples, all at the same n against the same held-out reference.

    PYTHONPATH=src python experiments/cifar10_fair/ladder.py --root .data/cifar10-train.zip \\
        --extractor c0=outputs/fair/extractor-s0/cifar10-resnet9.pt c1=outputs/fair/extractor-s1/cifar10-resnet9.pt \\
        --samples peer-dpmpp2m=outputs/fair/samplers/dpmpp2m.npz ... --out ladder.json

- **Reference**: the 5,000 held-out images of the framework's split (``conf/data/folder.yaml``: val_fraction 0.1,
  seed 0), which neither the classifiers nor the diffusion models ever train on: what every FD of
  ``experiments/cifar10_f_sweep`` was measured against (``reference_split=val``).
- **Rungs** (each a fresh random draw of n training images, ``--draws`` draws, mean and range): the training
  images themselves (real against held-out: the floor), JPEG quality 50, a 3x3 box blur, Gaussian noise of
  sigma 0.1 and 0.2 (of the [-1, 1] range: 12.75 and 25.5 of 255 levels), and the real images with 1 in 8
  replaced by a blank frame (half white, half black: what 8 blank frames in a 64-sample grid cost).
- **Samples**: ``NAME=FILE`` with FILE an ``.npz`` holding uint8 ``images`` (N, 3, 32, 32 or N, 32, 32, 3, as
  ``stage=sample sample.format=npz`` writes them), a folder of PNGs, or
  ``grid:PATH`` (a torchvision ``save_image`` grid of 32x32 cells with 2-px padding, the sweep's saved grids).
  Every set is scored with every extractor; the ladder is computed at every n that a set has, so a 64-sample
  grid is read against rungs of 64 images, not against the 5,000-image floor (FD is biased upwards at small n).
- **Frame statistics** for every set and rung: the share of blank frames (a frame whose 8-bit values have a
  standard deviation below ``--blank-std`` levels: a uniform white, black or grey image), of saturated frames
  (half or more of a frame's values at 0 or 255) and of all 8-bit values at 0 or 255 (clipped). Real CIFAR-10
  has some of each; the rungs and the held-out images give their rate.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO / "src", REPO / "experiments" / "feature_extractors"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from lightning_ldm.metrics.features import FeatureExtractorSpec, build_feature_extractor  # noqa: E402
from lightning_ldm.metrics.frechet import GaussianStatistics, distance_to_reference  # noqa: E402
from lightning_ldm.metrics.ladder import degrade  # noqa: E402

RUNGS = ("training images", "jpeg q50", "blur 3x3", "noise 0.1", "noise 0.2", "1 in 8 blank")


# ------------------------------------------------------------------------------------------------ images
def load_samples(spec: str) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) from an .npz, a folder of PNGs, or grid:PATH."""
    if spec.startswith("grid:"):
        grid = np.array(Image.open(spec[5:]).convert("RGB"))
        cell, pad = 32, 2
        rows, cols = (grid.shape[0] - pad) // (cell + pad), (grid.shape[1] - pad) // (cell + pad)
        cells = [grid[pad + r * (cell + pad): pad + r * (cell + pad) + cell,
                      pad + c * (cell + pad): pad + c * (cell + pad) + cell] for r in range(rows) for c in range(cols)]
        return torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).contiguous()
    path = Path(spec)
    if path.suffix == ".npz":  # NCHW (peer_samplers.py) or NHWC (the framework's stage=sample format=npz)
        images = torch.from_numpy(np.load(path)["images"])
        return images.permute(0, 3, 1, 2).contiguous() if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3) \
            else images
    files = sorted(path.glob("*.png"))
    if not files:
        raise SystemExit(f"{spec}: not an .npz, a grid: or a folder of .png files")
    return torch.from_numpy(np.stack([np.array(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def frame_stats(images: torch.Tensor, blank_std: float) -> dict:
    """Share of blank frames (8-bit std below ``blank_std``), of frames with half or more of their values at 0 or
    255 (saturated), and of all 8-bit values at 0 or 255 (clipped)."""
    std = images.float().flatten(1).std(1)
    at_limit = ((images == 0) | (images == 255)).float().flatten(1)
    saturated = at_limit.mean(1) >= 0.5
    return {"blank_share": (std < blank_std).float().mean().item(), "blank_count": int((std < blank_std).sum()),
            "saturated_share": saturated.float().mean().item(), "saturated_count": int(saturated.sum()),
            "clipped_share": at_limit.mean().item()}


@torch.no_grad()
def features(extractor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor(chunk.to(extractor.device))["features"] for chunk in images.split(1000)])


def split_pixels(root: str, workers: int):
    """uint8 training and held-out images of the framework's split (the classifier script's own decoding)."""
    from train_classifier import build_datamodule, decode

    datamodule = build_datamodule("cifar10", root, workers)
    cpu = torch.device("cpu")
    train, _ = decode(datamodule.train_dataset, list(range(len(datamodule.train_dataset))), workers, cpu)
    heldout, _ = decode(datamodule.val_dataset, list(range(len(datamodule.val_dataset))), workers, cpu)
    return train, heldout, datamodule.identity()


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".data/cifar10-train.zip", help="the CIFAR-10 zip")
    parser.add_argument("--extractor", nargs="+", required=True, help="NAME=BUNDLE (train_classifier.py's .pt)")
    parser.add_argument("--samples", nargs="*", default=[], help="NAME=FILE (.npz, PNG folder or grid:PNG)")
    parser.add_argument("--n", type=int, default=5000, help="ladder size besides the sample sets' own sizes")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--blank-std", type=float, default=4.0, help="8-bit standard deviation of a blank frame")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--max-train", type=int, default=0, help="only this many training images (CPU check)")
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    train, heldout, identity = split_pixels(args.root, args.workers)
    if args.max_train:
        train = train[: args.max_train]
    print(f"{len(train)} training / {len(heldout)} held-out images, decoded in {time.perf_counter() - started:.1f} s")
    sets = {}
    for item in args.samples:
        name, spec = item.split("=", 1)
        sets[name] = load_samples(spec)
    sizes = sorted({args.n, *(len(s) for s in sets.values())})
    sizes = [min(n, len(train)) for n in sizes]
    extractors = {}
    for item in args.extractor:
        name, path = item.split("=", 1)
        spec = FeatureExtractorSpec(kind="checkpoint", name="cifar10-resnet9", path=path, feature_layer="pool")
        extractors[name] = build_feature_extractor(spec, device=device)

    result = {"reference": f"{len(heldout)} held-out images (val_fraction 0.1, seed 0)", "data_identity": identity,
              "draws": args.draws, "blank_std_8bit": args.blank_std, "device": str(device),
              "extractors": {k: e.describe() for k, e in extractors.items()},
              "heldout_frames": frame_stats(heldout, args.blank_std), "samples": {}, "ladder": {}}
    references = {k: GaussianStatistics.from_features(features(e, heldout)) for k, e in extractors.items()}
    for name, images in sets.items():
        row = {"n": len(images), **frame_stats(images, args.blank_std), "fd": {}}
        for key, extractor in extractors.items():
            row["fd"][key] = distance_to_reference(references[key], features(extractor, images))
        result["samples"][name] = row
    for n in sizes:
        generator = torch.Generator().manual_seed(n)  # the same draws for every extractor, whatever the order
        draws = []
        for rung in RUNGS:
            for _ in range(args.draws):
                pick = torch.randperm(len(train), generator=generator)[:n]
                draws.append((rung, degrade(train[pick], rung, generator)))
        rows = {}
        for rung in RUNGS:
            images = [d for r, d in draws if r == rung]
            stats = [frame_stats(d, args.blank_std) for d in images]
            row = {f"{k}_mean": float(np.mean([s[k] for s in stats]))
                   for k in ("blank_share", "saturated_share", "clipped_share")}
            row["fd"] = {}
            for key, extractor in extractors.items():
                fds = [distance_to_reference(references[key], features(extractor, d)) for d in images]
                row["fd"][key] = {"mean": float(np.mean(fds)), "min": min(fds), "max": max(fds), "all": fds}
            rows[rung] = row
        result["ladder"][str(n)] = rows
    result["seconds"] = time.perf_counter() - started

    keys = list(extractors)
    for n in sizes:
        print(f"\nn = {n}: FD against the {len(heldout)} held-out images; ladder rows mean [min, max] of "
              f"{args.draws} draws of training images")
        print(f"  {'set':<34}{'blank':>8}{'sat.':>8}{'clipped':>9}" + "".join(f"{'FD ' + k:>26}" for k in keys))
        for rung, row in result["ladder"][str(n)].items():
            cells = "".join(f"{row['fd'][k]['mean']:>10.2f} [{row['fd'][k]['min']:.2f}, {row['fd'][k]['max']:.2f}]"
                            .rjust(26) for k in keys)
            print(f"  {'[' + rung + ']':<34}{row['blank_share_mean']:>8.1%}{row['saturated_share_mean']:>8.1%}"
                  f"{row['clipped_share_mean']:>9.2%}{cells}")
        for name, row in result["samples"].items():
            if row["n"] == n:
                cells = "".join(f"{row['fd'][k]:>26.2f}" for k in keys)
                print(f"  {name:<34}{row['blank_share']:>8.1%}{row['saturated_share']:>8.1%}"
                      f"{row['clipped_share']:>9.2%}{cells}")
    frames = result["heldout_frames"]
    print(f"\nheld-out images: blank {frames['blank_share']:.2%}, saturated {frames['saturated_share']:.2%}, "
          f"clipped {frames['clipped_share']:.2%}; {result['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
