"""Setup time and peak memory of ``data=folder`` on a generated folder of many small files, each variant in a
fresh process (so the operating system's file cache is the only thing shared: every variant after the first finds
the folder's metadata cached, as a second run would; the first variant pays the cold read).

    PYTHONPATH=src python experiments/data/measure_folder_setup.py --files 1000000 --folder /tmp/folder1m \\
        --before /tmp/before/src --out experiments/data/results/folder_setup.json

Variants: ``before`` (the data module of another checkout, given by --before: its defaults, which verified every
file serially), ``after-cold`` (this checkout, no folder index yet: one walk and stat of every file, the index
written), ``after-warm`` (the index reused: one stat per folder), ``after-verify`` (the index reused and every
header checked in parallel, data.verify=true). Files: --files of them, 1,000 per folder, each the same 8x8
greyscale PNG (67 bytes), written once and reused by later calls.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
start = time.perf_counter()
from lightning_ldm.data.folder import ImageFolderDataModule
imported = time.perf_counter()
kwargs = json.loads(sys.argv[2])
data = ImageFolderDataModule(root=sys.argv[1], image_size=8, channels=1, batch_size=64, num_workers=0, **kwargs)
data.setup()
done = time.perf_counter()
print(json.dumps({"setup_seconds": round(done - imported, 2), "import_seconds": round(imported - start, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "train": len(data.train_dataset), "val": len(data.val_dataset)}))
"""


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(folder: Path, count: int, per_folder: int = 1000) -> None:
    marker = folder / f".complete-{count}"
    if marker.exists():
        return
    from tqdm import tqdm

    data = png_bytes()
    for i in tqdm(range(count), desc=f"writing {count} files", unit=" files", mininterval=2.0):
        sub = folder / f"{i // per_folder:05d}"
        if i % per_folder == 0:
            sub.mkdir(parents=True, exist_ok=True)
        with open(sub / f"{i:07d}.png", "wb") as handle:
            handle.write(data)
    marker.touch()


def run(src: str, folder: Path, kwargs: dict, cache: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "LIGHTNING_LDM_CACHE": cache, "OMP_NUM_THREADS": "1"}
    wall = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), json.dumps(kwargs)], env=env,
                            capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["process_seconds"] = round(time.perf_counter() - wall, 2)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--folder", default="/tmp/folder_setup")
    parser.add_argument("--before", help="src folder of the checkout to compare with (its defaults)")
    parser.add_argument("--out")
    args = parser.parse_args()
    folder = Path(args.folder) / f"n{args.files}"
    make_folder(folder, args.files)
    here = str(Path(__file__).resolve().parents[2] / "src")
    cache = tempfile.mkdtemp(prefix="folder_index_")
    variants = []
    if args.before:
        variants.append(("before", args.before, {}))
    variants += [("after-cold", here, {}), ("after-warm", here, {}), ("after-verify", here, {"verify": True})]
    results = {}
    for name, src, kwargs in variants:
        results[name] = run(src, folder, kwargs, cache)
        print(name, results[name], flush=True)
    record = {"files": args.files, "folders": -(-args.files // 1000), "machine": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
