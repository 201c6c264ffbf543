#!/usr/bin/env bash
# Multi-GPU runs on one node, one device call (repo root; carry .whl and .data):
#   bash experiments/scaling/run.sh
# 1. Same global batch on 1 and 2 GPUs, both stages, CIFAR-10 (GPU 0 | GPUs 1,2 in parallel): loss curves and the
#    scale factor across ranks.  2. Weak scaling of the celebahq-ldm-vq-4 UNet (64x64x3 inputs, batch 48 per GPU)
#    and the kl-f8 autoencoder (256x256, batch 12 per GPU) on 1, 2, 4 (, 8) GPUs; WEAK_RUNS picks runs (without
#    it: what DDP costs per compile mode on one GPU, then both modes on 2 GPUs).
#    Metrics come back as flat CSVs in $OUT/csv.tgz. PHASES="correctness" or "weak" for one; "allreduce" (not in
#    the default) times the UNet gradient's all-reduce alone on 2, 4 (, 8) GPUs first (allreduce_bench.py).
set -uo pipefail
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
phases=" ${PHASES:-correctness weak} "
phase() { [[ "$phases" == *" $1 "* ]]; }
root=/tmp/runs
mkdir -p "$root" "$OUT/csv"
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
nvidia-smi topo -m > "$OUT/csv/topology.txt" 2>&1
quiet() { grep --line-buffered -v "it/s\]$\|it/s, \|s/it\]\|^\s*$" || true; }   # line-buffered: a cut run still logs
keep() {  # keep(<stage> <run>): the run's metrics (and profiler table, if traced), flat
  cp "$root/outputs/$1/$2/csv/metrics.csv" "$OUT/csv/$2.csv" 2>/dev/null || echo "no metrics for $2"
  local table; for table in "$root/outputs/$1/$2"/fit*trace*.txt; do  # fit-trace.txt, per-rank names under DDP
    [ -f "$table" ] && cp "$table" "$OUT/csv/$2-$(basename "$table")"; done
}

if phase allreduce; then  # the interconnect alone (allreduce_bench.py)
  for n in 2 4 8; do
    [ "$n" -le "$gpus" ] && NCCL_DEBUG=INFO python3 experiments/scaling/allreduce_bench.py --world "$n" \
      --out "$OUT/csv/allreduce-${n}gpu.json" 2>&1 | grep -v "^\s*$" | grep -i "ranks,\|via\|NCCL version" \
      | sort -u | tee "$OUT/csv/allreduce-${n}gpu.log"
  done
fi

if phase correctness; then
  cifar=(data=folder data.root=.data/cifar10-train.zip data.channels=3 data.num_workers=6 logger=csv
         "paths.output_root=$root/outputs" trainer.limit_val_batches=8 callbacks.throughput.every_n_batches=50)
  s1=(stage=autoencoder autoencoder=kl-f4-small autoencoder.ch=64 max_steps=300 module.lr=2e-4 loss.disc_start=150
      trainer.val_check_interval=150 module.image_log_every=0 "${cifar[@]}")
  s2=(stage=diffusion unet=small max_steps=400 module.lr=2e-4 module.warmup_steps=100 module.ema_decay=0.999
      trainer.val_check_interval=200 module.num_log_images=0 "${cifar[@]}")
  ae=$root/outputs/autoencoder/s1-1gpu/export/autoencoder.safetensors
  (
    CUDA_VISIBLE_DEVICES=0 python3 -m lightning_ldm "${s1[@]}" trainer=gpu data.batch_size=128 run_name=s1-1gpu 2>&1 | quiet > "$OUT/csv/s1-1gpu.log"
    keep autoencoder s1-1gpu
    CUDA_VISIBLE_DEVICES=0 python3 -m lightning_ldm "${s2[@]}" trainer=gpu data.batch_size=128 run_name=s2-1gpu autoencoder.path=$ae 2>&1 | quiet > "$OUT/csv/s2-1gpu.log"
    keep diffusion s2-1gpu
  ) &
  (
    CUDA_VISIBLE_DEVICES=1,2 python3 -m lightning_ldm "${s1[@]}" trainer=ddp trainer.devices=2 data.batch_size=64 run_name=s1-2gpu 2>&1 | quiet > "$OUT/csv/s1-2gpu.log"
    keep autoencoder s1-2gpu
    for _ in $(seq 60); do [ -f "$ae" ] && break; sleep 3; done
    CUDA_VISIBLE_DEVICES=1,2 python3 -m lightning_ldm "${s2[@]}" trainer=ddp trainer.devices=2 data.batch_size=64 run_name=s2-2gpu autoencoder.path=$ae 2>&1 | quiet > "$OUT/csv/s2-2gpu.log"
    keep diffusion s2-2gpu
  ) &
  wait
  grep -h "scale_factor\|global batch" "$OUT"/csv/s*.log
  tar -C "$OUT" -czf "$OUT/csv.tgz" csv
fi

if phase weak; then
  # Weak scaling: a fixed per-GPU batch on synthetic inputs, each run capped at WEAK_TIMEOUT s. The whole default
  # plan runs on one machine; WEAK_RUNS picks runs: steps one after another, each "<run>[+<run>...]" (runs at the
  # same time), a run "[<tag>/]<model>:<N>[:ddp][@<gpus>]": models ldm4, klf8; N GPUs (N=1 runs trainer=gpu, 1:ddp
  # trainer=ddp with one device) from CUDA_VISIBLE_DEVICES or the listed ones; the tag prefixes the run's name
  # (e.g. "warm/ldm4:1": a second run once compile caches are warm) and TAG_<tag> adds that run's overrides.
  # Compilation takes 70-80 s per process on an idle GPU, 2-3 min beside other compiling jobs: keep WEAK_TIMEOUT
  # (default 420) at 300 or more. torch.compile's caches in /tmp speed up later runs only once a run has finished
  # compiling (a run cut mid-compilation leaves little behind).
  common=(logger=csv "paths.output_root=$root/outputs" data=synthetic data.num_images=8000 data.num_workers=6
          trainer.num_sanity_val_steps=0 trainer.val_check_interval=100000 trainer.limit_val_batches=0
          callbacks.throughput.every_n_batches=20 trainer.log_every_n_steps=20 callbacks.progress=null
          +trainer.enable_progress_bar=false)
  # celebahq-ldm-vq-4's UNet (274.1M) on its 64x64x3 latent shape through an identity first stage: the step of
  # training on cached latents, without building a cache first (an identity encoder costs nothing per step).
  ldm4=(stage=diffusion unet=ldm-4 autoencoder=identity module.cache_latents=false data.image_size=64 data.batch_size=48 module.lr=9.6e-5
        module.warmup_steps=0 module.ema_decay=0.9999 schedule.beta_start=0.0015 schedule.beta_end=0.0195
        module.num_log_images=0 max_steps=${WEAK_STEPS:-100} "${common[@]}")
  # The paper's kl-f8 first stage (83.7M; experiment=kl-f8 without its ImageNet folder) at 256x256, its batch of
  # 12, LPIPS and the discriminator on from batch 0 (the full step); LPIPS gets a random VGG16 trunk (timing only).
  vgg=/tmp/vgg16-random.pth
  [ -f $vgg ] || python3 -c "import torch, torchvision; torch.save(torchvision.models.vgg16().state_dict(), '$vgg')"
  klf8=(stage=autoencoder autoencoder=kl-f8 loss=lpips-gan module.lr=1.08e-4 data=synthetic data.image_size=256
        data.batch_size=12 module.accumulate_grad_batches=1 loss.disc_start=0 "loss.lpips_weights=$vgg" module.image_log_every=0 max_steps=${WEAK_STEPS_AE:-100} "${common[@]}")
  stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done; }
  weak() {  # weak <model> <N> [ddp] [tag]: one run on the first N GPUs of CUDA_VISIBLE_DEVICES (or all GPUs)
    local model=$1 n=$2 mode=${3:-} tag=${4:-} name start trainer; start=$(date +%s)
    if [ "$n" = 1 ] && [ "$mode" != ddp ]; then trainer=(trainer=gpu); name=$model-single-1gpu
    else trainer=(trainer=ddp "trainer.devices=$n"); name=$model-ddp-${n}gpu; fi
    name=${tag:+$tag-}$name
    local -n overrides=$model
    local tag_overrides="TAG_$tag"; local -a extra=(${!tag_overrides:-})  # TAG_<tag>="key=value ...": that run's own
    # A run of the same name left by an earlier call on this machine would resume and find nothing left to do
    # (it happened once); compile caches live elsewhere (/tmp/torchinductor_*) and stay warm.
    case $model in ldm4) rm -rf "$root/outputs/diffusion/$name" ;; *) rm -rf "$root/outputs/autoencoder/$name" ;; esac
    # -k: SIGTERM only asks for a checkpoint at the end of the batch (pre-emption); a run still compiling needs KILL
    timeout -k 30 "${WEAK_TIMEOUT:-420}" python3 -m lightning_ldm "${overrides[@]}" "${trainer[@]}" "${extra[@]}" run_name=$name 2>&1 \
      | quiet | stamp > "$OUT/csv/$name.log"
    case $model in ldm4) keep diffusion "$name" ;; *) keep autoencoder "$name" ;; esac
    echo "$(date +%T) $name: $(( $(date +%s) - start )) s"
  }
  step() {  # step "<run>[+<run>...]": runs joined by + at the same time, each [<tag>/]<model>:<N>[:ddp][@<gpus>]
    local run spec gpus tag model n mode
    for run in ${1//+/ }; do
      spec=${run%@*}; gpus=; [ "$spec" != "$run" ] && gpus=${run#*@}
      tag=; [ "${spec#*/}" != "$spec" ] && { tag=${spec%%/*}; spec=${spec#*/}; }
      IFS=: read -r model n mode <<< "$spec"
      ( [ -n "$gpus" ] && export CUDA_VISIBLE_DEVICES=$gpus; weak "$model" "$n" "$mode" "$tag" ) &
    done
    wait
  }
  # Tags with their own overrides (see README "2026-11-26, 4 x H100, recorded in 1e58ccb"): how compile meets DDP (whole: no_optimization, the
  # default since revision 28a0922; split: ddp_optimizer), DDP's own 25 MB gradient buckets (small; ours are 200
  # MB since revision 28a0922, "big" in earlier sections), eager DDP, the discriminator without SyncBatchNorm,
  # the profiler (debug=trace: 14 batches, fit-trace.txt comes back beside the CSV), and stage 2 without CUDA graphs
  # (on by default since revision a3b85cf).
  : "${TAG_whole:=trainer.strategy.compiled_ddp=no_optimization}" "${TAG_split:=trainer.strategy.compiled_ddp=ddp_optimizer}"
  : "${TAG_small:=trainer.strategy.bucket_cap_mb=25}"
  : "${TAG_nographs:=module.cuda_graphs=false}"
  : "${TAG_eager:=module.compile=false}" "${TAG_nosync:=trainer.sync_batchnorm=false}" "${TAG_trace:=debug=trace}"
  if [ -n "${WEAK_RUNS:-}" ]; then  # space-separated steps, one after another
    for run in $WEAK_RUNS; do step "$run"; done
  elif [ "$gpus" -ge 4 ]; then  # what DDP costs on one GPU without communication, per mode, all at once; then
    step "ldm4:1@0+ldm4:1:ddp@1+split/ldm4:1:ddp@2+small/ldm4:1:ddp@3"  # both modes on 2 GPUs at once (README
    step "ldm4:2@0,1+split/ldm4:2@2,3"                                # README "2026-11-26, 4 x H200, revision 57bc18b" has the kl-f8 call)
  else
    step ldm4:1; step ldm4:1:ddp
    [ "$gpus" -ge 2 ] && step ldm4:2
  fi
  python3 experiments/scaling/summarize.py "$root/outputs" | tee "$OUT/weak_scaling.md"
  tar -C "$OUT" -czf "$OUT/csv.tgz" csv
fi
ls -la "$OUT"
