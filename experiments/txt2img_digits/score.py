"""Score text-to-image samples of captioned digits: prompt accuracy on seen and held-out combinations, the same
images against shuffled prompts (chance), real scenes drawn for the same prompts (the scorer's ceiling), and a
Frechet distance with a ladder of known degradations beside it.

    PYTHONPATH=src python experiments/txt2img_digits/score.py --samples seen=DIR held_out=DIR \\
        --repeats 3 --reader outputs/txt2img_digits/digit_reader.safetensors --out results.json

Each samples folder is what ``stage=sample sample.prompt_file=...`` wrote: PNGs and ``metadata.jsonl`` (file name,
prompt). The prompt files come from ``--write-prompts`` (``evaluation_prompts`` of the data, ``--count`` each).
With ``num_samples = repeats x count``, image i has seed i and prompt i mod count: ``--repeats`` groups the images
by seed block, and every score is given as the mean over blocks with the lowest and highest block.

- **Prompt accuracy** (``lightning_ldm.metrics.prompt_accuracy``): the share of right digit / colour / size /
  relation facts, the right number of digits, and ``all`` (every fact of the image right).
- **Shuffled prompts**: the same images scored against the prompts rotated by one: what a model that ignores its
  prompt scores (chance given the data's proportions).
- **Real scenes**: the data's own renderer drawing each prompt's scene (different handwriting and positions from
  the training set): the best a perfect model can score with this reader.
- **FD-reader**: the Frechet distance between 192-d features (the digit reader's pooled features of each colour
  channel of the whole image at 20x20) of the samples and of the real scenes of the same prompts. It has no
  external meaning, so beside it: real scenes of *other* prompts of the same kind (the floor at this n), and those
  real scenes blurred (3x3 box), noised (sigma 0.2 of the [-1, 1] range), JPEG q50, and pure noise.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_ldm.data.captioned_digits import describe_scene, evaluation_scenes, render_scene
from lightning_ldm.metrics.frechet import GaussianStatistics, frechet_distance
from lightning_ldm.metrics.ladder import degrade
from lightning_ldm.metrics.prompt_accuracy import (DigitReader, load_digit_reader, save_digit_reader,
                                                   score_prompts, train_digit_reader)

FACTS = ("digit", "colour", "size", "relation", "count", "all")
RUNGS = ("real, other prompts", "jpeg q50", "blur 3x3", "noise 0.2", "pure noise")


def load_samples(folder: Path) -> tuple[torch.Tensor, list[str]]:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [np.array(Image.open(folder / row["file_name"]).convert("RGB")) for row in rows]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), [row["text"] for row in rows]


def real_scenes(kind: str, count: int, image_size: int, seed: int, max_digits: int,
                digit_scale: float) -> tuple[torch.Tensor, list[str]]:
    scenes = evaluation_scenes(kind, count, seed, max_digits)
    return (torch.stack([render_scene(s, image_size, digit_scale) for s in scenes]),
            [describe_scene(s) for s in scenes])


def block_scores(images: torch.Tensor, prompts: list[str], reader: DigitReader, repeats: int,
                 digit_scale: float) -> dict:
    """Scores of each seed block, then mean / min / max over blocks."""
    per_block = []
    for block_images, block_prompts in zip(images.chunk(repeats), np.array_split(np.array(prompts), repeats)):
        result = score_prompts(block_images, list(block_prompts), reader, digit_scale)
        per_block.append({fact: result[fact] for fact in FACTS})
    summary = {}
    for fact in FACTS:
        values = [block[fact] for block in per_block if block[fact] is not None]
        summary[fact] = None if not values else {"mean": float(np.mean(values)), "min": min(values),
                                                 "max": max(values)}
    return {"blocks": per_block, "summary": summary}


@torch.no_grad()
def reader_features(images: torch.Tensor, reader: DigitReader) -> torch.Tensor:
    x = images.float() / 255
    x = F.interpolate(x, size=(20, 20), mode="area")
    n, c = x.shape[:2]
    return reader.body(x.reshape(n * c, 1, 20, 20)).reshape(n, -1).double()


def fd(reference: torch.Tensor, images: torch.Tensor, reader: DigitReader) -> float:
    return frechet_distance(GaussianStatistics.from_features(reader_features(reference, reader)),
                            GaussianStatistics.from_features(reader_features(images, reader)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", nargs="*", default=[], help="KIND=FOLDER, KIND seen or held_out")
    parser.add_argument("--repeats", type=int, default=1, help="seed blocks per folder (num_samples / count)")
    parser.add_argument("--reader", required=True, help="digit reader (.safetensors); trained and saved if missing")
    parser.add_argument("--write-prompts", help="folder: write seen.txt and held_out.txt (--count prompts each)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--max-digits", type=int, default=2, help="the data's max_digits (1: single-digit scenes)")
    parser.add_argument("--digit-scale", type=float, default=1.0, help="the data's digit_scale")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    if args.write_prompts:
        folder = Path(args.write_prompts)
        folder.mkdir(parents=True, exist_ok=True)
        for kind in ("seen", "held_out"):
            prompts = [describe_scene(s) for s in evaluation_scenes(kind, args.count, max_digits=args.max_digits)]
            (folder / f"{kind}.txt").write_text("\n".join(prompts) + "\n")
        print(f"wrote {args.count} prompts each to {folder}/seen.txt and held_out.txt")
    if not args.samples:
        return
    reader_path = Path(args.reader)
    if not reader_path.is_file():
        reader_path.parent.mkdir(parents=True, exist_ok=True)
        save_digit_reader(train_digit_reader(0), reader_path)
        print(f"trained the digit reader (seed 0) and saved it to {reader_path}")
    reader = load_digit_reader(reader_path)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for spec in args.samples:
        kind, folder = spec.split("=", 1)
        images, prompts = load_samples(Path(folder))
        count = len(prompts) // args.repeats
        size = images.shape[-1]
        real, real_prompts = real_scenes(kind, count, size, seed=0, max_digits=args.max_digits,
                                          digit_scale=args.digit_scale)
        if real_prompts != prompts[:count]:
            raise SystemExit(f"{folder}: its prompts are not evaluation_prompts({kind!r}, {count}) in order")
        other, _ = real_scenes(kind, count * args.repeats, size, seed=1, max_digits=args.max_digits,
                               digit_scale=args.digit_scale)
        reference = real.repeat(args.repeats, 1, 1, 1)
        entry = {
            "n_images": len(images), "max_digits": args.max_digits,
            "digit_scale": args.digit_scale, "n_prompts": count, "repeats": args.repeats, "image_size": size,
            "samples": block_scores(images, prompts, reader, args.repeats, args.digit_scale),
            "shuffled_prompts": block_scores(images, prompts[1:] + prompts[:1], reader, args.repeats,
                                             args.digit_scale),
            "real_scenes": block_scores(real, prompts[:count], reader, 1, args.digit_scale),
            "fd_reader": {"samples": fd(reference, images, reader),
                          **{rung: fd(reference, other if rung.startswith("real") else degrade(other, rung, generator),
                                      reader) for rung in RUNGS}},
        }
        results[kind] = entry
        print(f"\n== {kind}: {len(images)} images, {count} prompts x {args.repeats} seed blocks, {size}x{size}")
        print(f"{'':18s}" + "".join(f"{fact:>20s}" for fact in FACTS))
        for name in ("samples", "shuffled_prompts", "real_scenes"):
            cells = []
            for fact in FACTS:
                s = entry[name]["summary"][fact]
                cells.append("-" if s is None else f"{100 * s['mean']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]")
            print(f"{name:18s}" + "".join(f"{c:>20s}" for c in cells))
        print("FD-reader: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["fd_reader"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
