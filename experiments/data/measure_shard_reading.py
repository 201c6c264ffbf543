"""Reading throughput of data=shards per loader worker: the CIFAR-10 zip written as shards of 1,000 images, then
one pass over them through the DataLoader as training reads them (decode, preprocess to 32x32, flip), for 0, 1 and
2 workers, images per second, in a fresh process each.

    PYTHONPATH=src python experiments/data/measure_shard_reading.py --source ../shared/data/cifar10-train.zip \\
        --shards /tmp/cifar10-shards --out experiments/data/results/shard_reading.json
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from lightning_ldm.data.shards import ShardDataModule
data = ShardDataModule(urls=sys.argv[1], image_size=32, channels=3, batch_size=256, num_workers=int(sys.argv[2]))
start = time.perf_counter()
count = sum(len(batch["label"]) for batch in data.train_dataloader())
seconds = time.perf_counter() - start
print(json.dumps({"images": count, "seconds": round(seconds, 2), "images_per_second": round(count / seconds, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="../shared/data/cifar10-train.zip")
    parser.add_argument("--shards", default="/tmp/cifar10-shards")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out")
    args = parser.parse_args()
    from lightning_ldm.data.write_shards import write_shards

    start = time.perf_counter()
    index = write_shards(args.source, args.shards, shard_size=1000, workers=os.cpu_count() or 1)
    written = time.perf_counter() - start
    results = {"write_seconds": round(written, 1), "shards": len(index["shards"]), "images": index["num_samples"],
               "cpus": os.cpu_count(), "reading": {}}
    for workers in args.workers:
        out = subprocess.run([sys.executable, "-c", CHILD, args.shards, str(workers)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        results["reading"][f"{workers} workers"] = json.loads(out.strip().splitlines()[-1])
        print(workers, results["reading"][f"{workers} workers"], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
