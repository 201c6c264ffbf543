#!/usr/bin/env bash
# Issue "Performance" on one GPU, one device call: the peers (diffusers) and our networks in one process, then our
# benchmark stage for the celebahq-ldm-vq-4 preset (stage 2 cached / on the fly, sampling). Flat files in $OUT.
#   bash experiments/benchmarks/run_perf.sh       (repo root; carry .whl and .unetbench/whl)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .unetbench/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__)"
start=$(date +%s)
timeout ${PEERS_S:-200} python3 experiments/benchmarks/peers.py --only unet_train --steps 15 --warmup 3 --budget-s 190 \
  --out "$OUT/peers.json" > "$OUT/peers.log" 2>&1
echo "peers: $(( $(date +%s) - start )) s"; tail -12 "$OUT/peers.log"
start=$(date +%s)
timeout ${BENCH_S:-280} python3 -m lightning_ldm stage=benchmark experiment=celebahq-ldm-vq-4 data.root=unused logger=none \
  benchmark.warmup=8 benchmark.steps=10 benchmark.repeats=3 benchmark.sample_batch_size=128 benchmark.sample_repeats=2 \
  benchmark.output="$OUT/benchmark-celebahq-ldm-vq-4.json" "paths.output_root=/tmp/bench" > "$OUT/benchmark.log" 2>&1
echo "benchmark stage: $(( $(date +%s) - start )) s"; grep -v "it/s\]" "$OUT/benchmark.log" | tail -12
