"""Memory of one rank reading the latent cache: the cache file loaded whole (the old behaviour) against mapped
into memory (``latent/cache.py`` now), for N latents, each variant in a fresh process.

    PYTHONPATH=src python experiments/data/measure_latent_cache.py --counts 100000 1000000 \\
        --out experiments/data/results/latent_cache_memory.json

The cache holds what ``encode_dataset`` writes: posterior mean and std as float16 (N, 4, 8, 8) and labels. The
process builds a ``LatentDataset`` and reads one epoch's worth of STEPS batches of 256 at random. Reported from
/proc/self/status after loading and at the end: RssAnon (memory private to the process: what each rank and each
loader worker would hold on its own) and RssFile (pages of the mapped file: the page cache's, shared by every
process of the machine and dropped under memory pressure), each in MiB. (Not the peak RSS: a child inherits its
parent's high-water mark at fork, and the parent has just written the cache.)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, sys, torch
from torch.utils.data import DataLoader
from lightning_ldm.latent.cache import LatentDataset

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields

path, mmap, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
before = status()
cache = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
dataset = LatentDataset(cache)
loaded = status()
sampler = torch.utils.data.RandomSampler(dataset, num_samples=256 * steps, generator=torch.Generator().manual_seed(0))
for batch in DataLoader(dataset, batch_size=256, sampler=sampler):
    pass
print(json.dumps({"start": before, "loaded": loaded, "after_reading": status()}))
"""


def write_cache(path: Path, count: int) -> None:
    if path.exists():
        return
    generator = torch.Generator().manual_seed(0)
    shape = (count, 4, 8, 8)
    torch.save({"mean": torch.randn(shape, generator=generator).half(), "std": torch.rand(shape, generator=generator).half(),
                "labels": torch.randint(0, 10, (count,), generator=generator)}, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {}
    for count in args.counts:
        path = Path(args.folder) / f"latents-{count}.pt"
        write_cache(path, count)
        for name, mmap in (("loaded whole", "0"), ("memory-mapped", "1")):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), mmap, str(args.steps)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            results[f"{count} {name}"] = {"file_mib": round(path.stat().st_size / 2**20, 1),
                                          **json.loads(out.strip().splitlines()[-1])}
            print(f"{count} {name}", results[f"{count} {name}"], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"steps": args.steps, "batch": 256, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
