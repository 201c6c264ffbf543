"""Memory of one rank reading the latent cache: its chunk files loaded whole into the process (as a cache read
without mapping would be) against mapped into memory by ``LatentDataset`` (``latent/cache.py``), for N latents,
each variant in a fresh process.

    PYTHONPATH=src python experiments/data/measure_latent_cache.py --counts 100000 1000000 \\
        --out experiments/data/results/latent_cache_memory.json

The cache holds what ``encode_chunks`` writes: chunks of CHUNK_ITEMS latents, each posterior mean and std as float16
(n, 4, 8, 8) and labels. The process builds a ``LatentDataset`` (or, loaded whole, concatenates the chunks) and reads one epoch's worth of STEPS batches of 256 at random. Reported from
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
from pathlib import Path
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
paths = sorted(Path(path).glob("chunk-*.pt"))
if mmap:
    dataset = LatentDataset(paths)
else:
    chunks = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    whole = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
    del chunks
    class Whole(torch.utils.data.Dataset):
        def __len__(self):
            return whole["labels"].shape[0]
        def __getitem__(self, i):
            return {"latent_mean": whole["mean"][i].float(), "latent_std": whole["std"][i].float(),
                    "label": int(whole["labels"][i])}
    dataset = Whole()
loaded = status()
sampler = torch.utils.data.RandomSampler(dataset, num_samples=256 * steps, generator=torch.Generator().manual_seed(0))
for batch in DataLoader(dataset, batch_size=256, sampler=sampler):
    pass
print(json.dumps({"start": before, "loaded": loaded, "after_reading": status()}))
"""


def write_cache(folder: Path, count: int) -> None:
    from lightning_ldm.latent.cache import CHUNK_ITEMS, chunk_path

    if folder.exists():
        return
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index, start in enumerate(range(0, count, CHUNK_ITEMS)):
        shape = (min(CHUNK_ITEMS, count - start), 4, 8, 8)
        torch.save({"mean": torch.randn(shape, generator=generator).half(),
                    "std": torch.rand(shape, generator=generator).half(),
                    "labels": torch.randint(0, 10, shape[:1], generator=generator)}, chunk_path(folder, index))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {}
    for count in args.counts:
        path = Path(args.folder) / f"latents-{count}"
        write_cache(path, count)
        size = sum(p.stat().st_size for p in path.glob("chunk-*.pt"))
        for name, mmap in (("loaded whole", "0"), ("memory-mapped", "1")):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), mmap, str(args.steps)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            results[f"{count} {name}"] = {"files_mib": round(size / 2**20, 1),
                                          **json.loads(out.strip().splitlines()[-1])}
            print(f"{count} {name}", results[f"{count} {name}"], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"steps": args.steps, "batch": 256, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
