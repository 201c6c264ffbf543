#!/usr/bin/env bash
# Both stages and sampling on CIFAR-10 (the shared zip, read unchanged) on one GPU: a smoke run that the
# GPU path (bf16 autocast, fused AdamW, cached latents, workers over a zip) works end to end.
# Usage on the GPU machine (repo root; wheels in .whl, the zip in .data):
#   bash experiments/gpu_smoke/run.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
root=$OUT/outputs
common=(logger=csv "paths.output_root=$root" data=folder data.root=.data/cifar10-train.zip data.channels=3
        data.num_workers=8 trainer=gpu)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

start=$(date +%s)
python3 -m lightning_ldm stage=autoencoder "${common[@]}" run_name=cifar-kl-f4 autoencoder=kl-f4-small \
  autoencoder.ch=64 data.batch_size=128 max_steps=1500 module.lr=2e-4 loss.disc_start=1000 \
  trainer.val_check_interval=500 trainer.limit_val_batches=8 2>&1 | grep -v "it/s\]$" | tail -8
echo "stage 1 wall: $(( $(date +%s) - start )) s"

start=$(date +%s)
python3 -m lightning_ldm stage=diffusion "${common[@]}" run_name=cifar-ldm unet=small data.batch_size=128 \
  max_steps=3000 module.lr=2e-4 module.cache_latents=true module.ema_decay=0.999 \
  trainer.val_check_interval=1000 trainer.limit_val_batches=8 2>&1 | grep -v "it/s\]$" | tail -8
echo "stage 2 wall: $(( $(date +%s) - start )) s"

start=$(date +%s)
python3 -m lightning_ldm stage=sample "paths.output_root=$root" run_name=cifar-samples sample.num_samples=256 \
  sample.batch_size=256 2>&1 | tail -3
echo "sampling wall: $(( $(date +%s) - start )) s"

tar -C "$root" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='latent_cache' -czf "$OUT/runs.tgz" .
ls -la "$OUT"
