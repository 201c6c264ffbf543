#!/usr/bin/env bash
# FID cost on the GPU machine (repo root, wheels in .whl): the benchmark, then a short stage-2 run through the
# CLI with callbacks=fid (pixel space, 512 random-colour images, random-weights Inception: timing and plumbing
# only) to check the callback, its best-FID checkpoint and bf16 sampling on a GPU.
#   bash experiments/benchmarks/run_fid_cost.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 experiments/benchmarks/fid_cost.py --out "$OUT/fid_cost.json" 2>&1 | grep -v "it/s\]$" | tail -40

work=/tmp/fidrun
python3 - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from fid_helpers import smooth_images, write_folder, write_random_inception_weights
work = Path(sys.argv[1])
write_folder(work / "data", smooth_images(512, seed=0))
write_random_inception_weights(work / "inception.pth")
PY
start=$(date +%s)
python3 -m lightning_ldm stage=diffusion autoencoder=identity data=folder data.root=$work/data data.channels=3 \
  data.num_workers=2 data.batch_size=64 logger=csv trainer=gpu max_steps=60 trainer.val_check_interval=30 \
  module.num_log_images=0 callbacks=fid callbacks.fid.every_n_steps=20 callbacks.fid.num_samples=1000 \
  callbacks.fid.feature_extractor.weights_path=$work/inception.pth "paths.output_root=$OUT/outputs" run_name=fid \
  2>&1 | grep -v "it/s\]$" | tail -15
echo "stage 2 with FID wall: $(( $(date +%s) - start )) s"
ls "$OUT/outputs/diffusion/fid/checkpoints"
python3 - "$OUT/outputs/diffusion/fid/csv/metrics.csv" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    fid = {k: v for k, v in row.items() if "fid" in k and v}
    if fid:
        print(row["step"], fid)
PY
rm -rf "$OUT/outputs/diffusion/fid/checkpoints" "$OUT/outputs/diffusion/fid/export" "$OUT/outputs/fid_reference"
