#!/usr/bin/env bash
# Several experiment scripts at once on one multi-GPU machine, one device call (repo root):
#   bash experiments/parallel.sh "<name>@<gpus>: <command>" ...        e.g.
#   bash experiments/parallel.sh "ae-f2@1: bash experiments/cifar10_f_sweep/run.sh ae-f2" "perf@3: PART=unet ..."
# Each job sees CUDA_VISIBLE_DEVICES=<gpus> (a comma list), SKIP_INSTALL=1 (the wheels in .whl, .fsweep/whl and
# .unetbench/whl are installed once, here) and its own OUT=/tmp/jobs/<name>. Everything small that the jobs
# write there (logs, CSV, JSON, PNG; no *.pt, *.ckpt, *.safetensors) comes back as $OUT/results.tgz, re-packed
# every 30 s so a call cut at its time limit still returns what finished; files named in KEEP (space-separated
# "path" or "path=name") are copied into $OUT at the end, next to it. The GPU machine returns at most 8 files: this makes 1 + KEEP.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
JOBS=/tmp/jobs
mkdir -p "$OUT" "$JOBS"
wheels=(); for w in .whl/*.whl .fsweep/whl/*.whl .unetbench/whl/*.whl; do [ -f "$w" ] && wheels+=("$w"); done
declare -A seen; unique=()
for w in "${wheels[@]}"; do b=$(basename "$w"); [ -z "${seen[$b]:-}" ] && { seen[$b]=1; unique+=("$w"); }; done
[ ${#unique[@]} -gt 0 ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${unique[@]}" 2>&1 | grep -v "^WARNING: Target"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SKIP_INSTALL=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

pack() {
  tar -C "$JOBS" --exclude='*.pt' --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.npz' \
    -czf "$OUT/results.tgz.tmp" . 2>/dev/null && mv -f "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
( while sleep 30; do pack; done ) &
packer=$!
pids=()
for job in "$@"; do
  head=${job%%:*}; command=${job#*:}
  name=${head%@*}; gpus=${head#*@}
  mkdir -p "$JOBS/$name"
  echo "[$(date -u +%H:%M:%S)] start $name on GPU(s) $gpus: $command"
  ( export CUDA_VISIBLE_DEVICES=$gpus OUT=$JOBS/$name; start=$(date +%s)
    bash -c "$command" > "$JOBS/$name/job.log" 2>&1; rc=$?
    echo "[$(date -u +%H:%M:%S)] $name exit $rc after $(( $(date +%s) - start )) s" | tee -a "$JOBS/$name/job.log" ) &
  pids+=($!)
done
wait "${pids[@]}"
kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
pack
for keep in ${KEEP:-}; do
  f=${keep%%=*}; name=${keep#*=}; [ "$name" = "$keep" ] && name=$(basename "$f")
  [ -f "$f" ] && cp "$f" "$OUT/$name" || echo "KEEP: no $f"
done
ls -la "$OUT"
