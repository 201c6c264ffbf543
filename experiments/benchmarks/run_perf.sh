#!/usr/bin/env bash
# Issue "Performance" on one GPU per part (repo root; carry .whl and .unetbench/whl). Flat files in $OUT. The
# peers and ours run in the same call, so their ratio is measured on one machine. One part per GPU at once:
#   bash experiments/parallel.sh "unet@0: PART=unet bash experiments/benchmarks/run_perf.sh" \
#     "ae@1: PART=ae bash experiments/benchmarks/run_perf.sh" "sample@2: PART='sample ae-gn' bash ..." \
#     "train@3: PART='train-ldm4 train-ae' bash ..."
# Parts (PART may list several, run one after another):
#   unet    peers.py: our LDM-4 UNet training step against diffusers' UNet2DModel, both compiled, then eager
#   unet-cd peers.py: ours compiled with inductor's coordinate-descent tuning of kernel configurations
#   ae      peers.py: the kl-f4 pair's training step, ours and diffusers', compiled and eager
#   ae-gn   peers.py: ours compiled with nn.GroupNorm in place of the layout-keeping form (the A/B of group_norm.py)
#   ae-dec  peers.py: the kl-f4 decoder alone (sampling's decode), ours and diffusers', compiled and eager
#   unet-ours, ae-ours  peers.py: our LDM-4 UNet step / kl-f4 step compiled, alone (a baseline without the peers)
#   ae-cd   peers.py: our kl-f4 step compiled with coordinate-descent tuning (slow to compile: 4+ min)
#   ae-sdpa peers.py: our kl-f4 step compiled with SDPA for its 512-channel attention heads too (the A/B of
#           blocks.single_head_attention; run after ae or ae-ours on the same GPU)
#   ae-peer-classic  peers.py: diffusers' kl-f4 step, compiled and eager, with its classic attention processor
#           (baddbmm + softmax, no SDPA kernel): the peer given the same way around the slow kernel as ours
#   profile peers.py: the profiler's operator table (3 steps) of the UNet and kl-f4 steps, ours and diffusers' compiled
#   trace   debug=trace of the framework's LDM-4 training loop (run_trace.sh): the loop against the bare step
#   sample  stage=benchmark celebahq-ldm-vq-4, sampling row (20 dpmpp_2m steps + decode, batch 128)
#   train-ldm4  stage=benchmark celebahq-ldm-vq-4, cached and on-the-fly rows
#   train-ae    stage=benchmark kl-f4 (batch 8): L1 only, then with LPIPS and the discriminator
# LIMIT_S caps all the listed parts together (default 540 s); a part that would start with 30 s or less left is skipped.
set -uo pipefail
part=${PART:-unet}
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl .unetbench/whl/*.whl 2>&1 | grep -v "^WARNING: Target"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__)"
limit=${LIMIT_S:-540}
end=$(( $(date +%s) + limit ))
left() { echo $(( end - $(date +%s) )); }
out_of_time() { [ "$(left)" -gt 30 ] && return 1; echo "$1: skipped, $(left) s left"; }
peers() {  # peers <name> <peers.py arguments...>: one process, its JSON rewritten after every variant
  local name=$1; shift
  out_of_time "peers $name" && return
  timeout "$(left)" python3 experiments/benchmarks/peers.py --steps 20 --warmup 3 --budget-s $(( $(left) - 10 )) \
    --out "$OUT/peers-$name.json" "$@" > "$OUT/peers-$name.log" 2>&1
  echo "peers $name: rc $?"; tail -8 "$OUT/peers-$name.log"
}
bench() {  # bench <name> <overrides...>: stage=benchmark, its JSON written after every row
  local name=$1; shift
  out_of_time "benchmark $name" && return
  timeout "$(left)" python3 -m lightning_ldm stage=benchmark data.root=unused logger=none benchmark.warmup=8 \
    benchmark.steps=10 benchmark.repeats=3 benchmark.output="$OUT/benchmark-$name.json" "paths.output_root=/tmp/bench" \
    "$@" > "$OUT/benchmark-$name.log" 2>&1
  echo "benchmark $name: rc $?"; grep -v "it/s\]\|LOCAL_RANK" "$OUT/benchmark-$name.log" | tail -8
}
for part in $part; do case $part in
  unet) peers unet --only unet_train/ours-compiled unet_train/diffusers-compiled unet_train/ours-eager \
          unet_train/diffusers-eager ;;
  unet-cd) peers unet-cd --only unet_train/ours-compiled --inductor coordinate_descent_tuning=True ;;
  ae) peers ae --only ae_train ;;
  ae-ours) peers ae-ours --only ae_train/ours-compiled ;;
  ae-cd) peers ae-cd --only ae_train/ours-compiled --inductor coordinate_descent_tuning=True ;;
  ae-gn) peers ae-torch-gn --only ae_train/ours-compiled --ae-group-norm torch ;;
  ae-dec) peers ae-dec --only ae_decode ;;
  profile) peers profile --only unet_train compiled ae_train --profile 3 ;;
  unet-ours) peers unet-ours --only unet_train/ours-compiled ;;
  ae-peer-classic) peers ae-peer-classic --only ae_train/diffusers-compiled ae_train/diffusers-eager \
                     --diffusers-attention classic ;;
  ae-sdpa) peers ae-sdpa --only ae_train/ours-compiled --ae-attention sdpa ;;
  trace) TRACE_S=$(left) SKIP_INSTALL=1 bash experiments/benchmarks/run_trace.sh ;;
  sample) bench sample experiment=celebahq-ldm-vq-4 "benchmark.rows=[sampling]" benchmark.sample_batch_size=128 \
            benchmark.sample_repeats=2 ;;
  train-ldm4) bench ldm4 experiment=celebahq-ldm-vq-4 "benchmark.rows=[cached,on_the_fly]" ;;
  train-ae) bench kl-f4 experiment=kl-f4 benchmark.batch_size=8 ;;
  *) echo "PART must list unet, unet-cd, unet-ours, ae-ours, ae-cd, ae-sdpa, ae, ae-gn, ae-dec, profile, trace, sample,"\
       "train-ldm4, train-ae or ae-peer-classic"; exit 2 ;;
esac; done
