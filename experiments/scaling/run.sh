#!/usr/bin/env bash
# Multi-GPU runs on one node (GPU machine, repo root, wheels in .whl, CIFAR-10 zip in .data). Two phases, each one
# device call:
#   bash experiments/scaling/run.sh correctness   # 1 vs 2 GPUs at the same global batch on CIFAR-10, both stages
#                                                 # (+ the FID cost benchmark and the FD classifiers on spare GPUs)
#   bash experiments/scaling/run.sh weak          # weak scaling 1, 2, 4 (, 8) GPUs, fixed per-GPU batch, nothing else
set -euo pipefail
phase=${1:?correctness or weak}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
root=$OUT/outputs
mkdir -p "$root" "$OUT/logs"
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
quiet() { grep -v "it/s\]$\|it/s, \|s/it\]" || true; }

if [ "$phase" = correctness ]; then
  nvidia-smi topo -m > "$OUT/logs/topology.txt" 2>&1 || true
  cifar=(data=folder data.root=.data/cifar10-train.zip data.channels=3 data.num_workers=6 logger=csv
         "paths.output_root=$root" trainer.limit_val_batches=8 callbacks.throughput.every_n_batches=25)
  s1=(stage=autoencoder autoencoder=kl-f4-small autoencoder.ch=64 max_steps=400 module.lr=2e-4 loss.disc_start=200
      trainer.val_check_interval=200 module.image_log_every=0 "${cifar[@]}")
  s2=(stage=diffusion unet=small max_steps=600 module.lr=2e-4 module.warmup_steps=100 module.ema_decay=0.999
      trainer.val_check_interval=300 module.num_log_images=16 "${cifar[@]}")
  ae=$root/autoencoder/s1-1gpu/export/autoencoder.safetensors
  (  # GPU 0: one GPU, global batch 128
    CUDA_VISIBLE_DEVICES=0 python3 -m lightning_ldm "${s1[@]}" trainer=gpu data.batch_size=128 run_name=s1-1gpu 2>&1 | quiet > "$OUT/logs/s1-1gpu.log"
    CUDA_VISIBLE_DEVICES=0 python3 -m lightning_ldm "${s2[@]}" trainer=gpu data.batch_size=128 run_name=s2-1gpu autoencoder.path=$ae 2>&1 | quiet > "$OUT/logs/s2-1gpu.log"
  ) &
  (  # GPUs 1, 2: DDP, 64 per GPU (same global batch), same stage-1 export for stage 2
    CUDA_VISIBLE_DEVICES=1,2 python3 -m lightning_ldm "${s1[@]}" trainer=ddp trainer.devices=2 data.batch_size=64 run_name=s1-2gpu 2>&1 | quiet > "$OUT/logs/s1-2gpu.log"
    while [ ! -f "$ae" ]; do sleep 5; done
    CUDA_VISIBLE_DEVICES=1,2 python3 -m lightning_ldm "${s2[@]}" trainer=ddp trainer.devices=2 data.batch_size=64 run_name=s2-2gpu autoencoder.path=$ae 2>&1 | quiet > "$OUT/logs/s2-2gpu.log"
  ) &
  (  # GPU 3: FID cost (issue 4), then the FD feature extractors if their script is there
    CUDA_VISIBLE_DEVICES=3 python3 experiments/benchmarks/fid_cost.py --out "$OUT/fid_cost.json" 2>&1 | quiet > "$OUT/logs/fid_cost.log"
    if [ -f experiments/feature_extractors/train_classifier.py ]; then
      CUDA_VISIBLE_DEVICES=3 python3 experiments/feature_extractors/train_classifier.py --data cifar10 --root .data/cifar10-train.zip --out "$OUT/extractors/cifar10" > "$OUT/logs/classifier-cifar10.log" 2>&1 || true
      CUDA_VISIBLE_DEVICES=3 python3 experiments/feature_extractors/train_classifier.py --data digits --out "$OUT/extractors/digits" > "$OUT/logs/classifier-digits.log" 2>&1 || true
    fi
  ) &
  wait
  for f in "$OUT"/logs/*.log; do echo "== $f"; tail -6 "$f"; done
  grep -h "scale_factor" "$OUT"/logs/s2-*.log || true
fi

if [ "$phase" = weak ]; then
  # The celebahq-ldm-vq-4 model on 64x64x3 inputs (its latent shape) from synthetic data through the identity first
  # stage, cached; the kl-f8 preset's stage 1 at 256^2 on synthetic images (LPIPS with a random VGG trunk: same cost).
  python3 -c "import torch, torchvision; torch.save(torchvision.models.vgg16().state_dict(), '/tmp/vgg16-random.pth')"
  common=(logger=csv "paths.output_root=$root" data=synthetic data.num_workers=8 trainer.num_sanity_val_steps=0
          trainer.val_check_interval=100000 trainer.limit_val_batches=0 callbacks.throughput.every_n_batches=20)
  ldm4=(stage=diffusion unet=ldm-4 autoencoder=identity data.image_size=64 data.batch_size=48 module.lr=9.6e-5
        module.warmup_steps=0 module.ema_decay=0.9999 schedule.beta_start=0.0015 schedule.beta_end=0.0195
        module.num_log_images=0 max_steps=100 "${common[@]}")
  klf8=(stage=autoencoder autoencoder=kl-f8 loss=lpips-gan loss.lpips_weights=/tmp/vgg16-random.pth
        loss.perceptual_weight=1.0 loss.kl_weight=1e-6 loss.nll_reduction=sum loss.disc_start=100002
        data.image_size=256 data.batch_size=12 module.lr=1.08e-4 module.image_log_every=0 max_steps=80 "${common[@]}")
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || continue
    if [ "$n" = 1 ]; then trainer=(trainer=gpu); else trainer=(trainer=ddp trainer.devices=$n); fi
    python3 -m lightning_ldm "${ldm4[@]}" "${trainer[@]}" run_name=ldm4-${n}gpu 2>&1 | quiet > "$OUT/logs/ldm4-${n}gpu.log"
    tail -3 "$OUT/logs/ldm4-${n}gpu.log"
  done
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || continue
    if [ "$n" = 1 ]; then trainer=(trainer=gpu); else trainer=(trainer=ddp trainer.devices=$n); fi
    python3 -m lightning_ldm "${klf8[@]}" "${trainer[@]}" run_name=klf8-${n}gpu 2>&1 | quiet > "$OUT/logs/klf8-${n}gpu.log"
    tail -3 "$OUT/logs/klf8-${n}gpu.log"
  done
  python3 experiments/scaling/summarize.py "$root" | tee "$OUT/weak_scaling.md"
fi
find "$root" \( -name '*.ckpt' -o -name '*.safetensors' -o -name latent_cache -o -name fid_reference \) -prune -exec rm -rf {} + 2>/dev/null || true
tar -C "$OUT" -czf "$OUT/$phase.tgz" outputs logs $( [ -d "$OUT/extractors" ] && echo extractors ) && rm -rf "$root" "$OUT/logs"
ls -la "$OUT"
