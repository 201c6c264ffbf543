"""The quickstart's stage-2 model exported to diffusers and sampled there and here: same seeds, same sampler and
steps; prints and writes the largest pixel difference, the seconds of each side and a grid of both.

    python experiments/interop/compare.py <stage-2 run dir> <exported diffusers folder> <output dir> [n]
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lightning_ldm import load_pipeline

run, folder, out = (Path(a) for a in sys.argv[1:4])
n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(2)

ours_pipe = load_pipeline(run, device="cpu")
steps = ours_pipe.module.sampling.steps
start = time.perf_counter()
ours = np.stack([np.asarray(image) for image in ours_pipe(n=n, seed=0, batch_size=n)])
ours_seconds = time.perf_counter() - start

theirs_pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
start = time.perf_counter()
theirs = theirs_pipe(batch_size=n, generator=[torch.Generator().manual_seed(s) for s in range(n)],
                     num_inference_steps=steps, output_type="np").images
theirs_seconds = time.perf_counter() - start
theirs = (theirs * 255).round().astype(np.uint8)
if ours.ndim == 3:
    theirs = theirs[..., 0]  # a greyscale model: diffusers repeats nothing, but keep the comparison per channel

difference = np.abs(ours.astype(int) - theirs.astype(int))
result = {"run": str(run), "pipeline": type(theirs_pipe).__name__, "scheduler": type(theirs_pipe.scheduler).__name__,
          "sampler": ours_pipe.module.sampling.sampler, "steps": steps, "images": n,
          "max_pixel_difference_levels": int(difference.max()), "pixels_differing": float((difference > 0).mean()),
          "seconds_ours": round(ours_seconds, 2), "seconds_diffusers": round(theirs_seconds, 2),
          "device": "cpu, 2 threads", "torch": torch.__version__,
          "diffusers": __import__("diffusers").__version__}
print(json.dumps(result, indent=2))
(out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")


def grid(images: np.ndarray) -> np.ndarray:
    rows = int(np.ceil(len(images) / 8))
    padded = np.concatenate([images, np.zeros((rows * 8 - len(images), *images.shape[1:]), images.dtype)])
    return np.concatenate([np.concatenate(list(padded[r * 8:(r + 1) * 8]), axis=1) for r in range(rows)], axis=0)


gap = np.full((4, grid(ours).shape[1], *ours.shape[3:]), 255, np.uint8)
Image.fromarray(np.concatenate([grid(ours), gap, grid(theirs)])).save(out / "ours_above_diffusers.png")
