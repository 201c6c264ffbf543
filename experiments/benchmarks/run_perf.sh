#!/usr/bin/env bash
# Issue "Performance" on one GPU, one device call per part (repo root; carry .whl and .unetbench/whl). Flat files
# in $OUT. The peers and ours run in the same call, so their ratio is measured on one machine.
#   PART=unet bash experiments/benchmarks/run_perf.sh   # LDM-4 UNet vs diffusers; stage=benchmark celebahq-ldm-vq-4
#   PART=ae   bash experiments/benchmarks/run_perf.sh   # kl-f4 vs diffusers AutoencoderKL; stage=benchmark kl-f4
set -uo pipefail
part=${PART:-unet}
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl .unetbench/whl/*.whl 2>&1 | grep -v "^WARNING: Target"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__)"
if [ "$part" = unet ]; then groups=(unet_train); experiment=celebahq-ldm-vq-4; extra=()
else groups=(ae_train ae_decode); experiment=kl-f4; extra=(benchmark.batch_size=8); fi  # the batch 8
start=$(date +%s)
timeout ${PEERS_S:-260} python3 experiments/benchmarks/peers.py --only "${groups[@]}" --steps 15 --warmup 3 \
  --budget-s $(( ${PEERS_S:-260} - 10 )) --out "$OUT/peers-$part.json" > "$OUT/peers-$part.log" 2>&1
echo "peers: $(( $(date +%s) - start )) s"; tail -8 "$OUT/peers-$part.log"
start=$(date +%s)
timeout ${BENCH_S:-300} python3 -m lightning_ldm stage=benchmark experiment=$experiment data.root=unused logger=none \
  benchmark.warmup=8 benchmark.steps=10 benchmark.repeats=3 benchmark.sample_batch_size=128 benchmark.sample_repeats=2 \
  benchmark.output="$OUT/benchmark-$experiment.json" "paths.output_root=/tmp/bench" "${extra[@]}" > "$OUT/benchmark-$part.log" 2>&1
echo "benchmark stage: $(( $(date +%s) - start )) s"; grep -v "it/s\]\|LOCAL_RANK" "$OUT/benchmark-$part.log" | tail -8
