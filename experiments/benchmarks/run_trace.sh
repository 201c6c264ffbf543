#!/usr/bin/env bash
# Where a compiled LDM-4 UNet training step spends its GPU time: `debug=trace` (PyTorch profiler over 4 batches after
# 8 of warm-up) on the celebahq-ldm-vq-4 UNet at its batch of 48, 64x64x3 synthetic latents, one GPU. The operator
# table (fit-trace.txt) lands in $OUT; the Chrome trace stays in the run folder (tens of MB).
#   bash experiments/benchmarks/run_trace.sh          # repo root, wheels in .whl (SKIP_INSTALL=1 if installed)
set -uo pipefail
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
root=/tmp/trace
timeout "${TRACE_S:-300}" python3 -m lightning_ldm stage=diffusion unet=ldm-4 autoencoder=identity data=synthetic \
  data.num_images=2000 data.image_size=64 data.batch_size=48 module.lr=9.6e-5 module.warmup_steps=0 \
  schedule.beta_start=0.0015 schedule.beta_end=0.0195 module.num_log_images=0 trainer=gpu debug=trace logger=none \
  "paths.output_root=$root" run_name=ldm4-trace callbacks.progress=null +trainer.enable_progress_bar=false "$@" \
  > "$OUT/trace.log" 2>&1
echo "exit $?"
cp "$root/diffusion/ldm4-trace/fit-trace.txt" "$OUT/" && head -60 "$OUT/fit-trace.txt" | cut -c1-220
