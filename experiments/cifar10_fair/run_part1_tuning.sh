#!/usr/bin/env bash
# Part 1 of issue 27, the tuning: the diffusers peer over as many trials as our side had, each at the equal total
# budget (the peer has no stage 1 or cache: its total is its training time, torch.compile included, as in
# experiments/cifar10_f_sweep), with the sampler that the sampler study chose, the peer's own EMA rule unchanged.
#   PHASE=train bash experiments/cifar10_fair/run_part1_tuning.sh   # every trial, one per GPU, in waves
#   PHASE=score bash experiments/cifar10_fair/run_part1_tuning.sh   # 5,000 samples per trial, ladder.py, table
# Each trial takes about 8.5 minutes of one GPU (setup, 360 s of training, six FD evaluations): with 6+ GPUs the
# train phase is one call; on one GPU, one call per trial (TRIALS="512:8e-4"), the machine kept warm, or
# the score phase will find only the trials whose EMA weights are still on the machine.
# Carry .whl, .unetbench/whl and .data. Classifiers: outputs/fair/extractor-s{0,1} if there, else trained first.
# Settings: TRIALS (batch:lr pairs, default "128:2e-4 128:4e-4 512:4e-4 512:8e-4 1024:6e-4 1024:1e-3": batch 128,
# 512 and 1024 with two learning rates each, the pairs our side used at each batch plus one more), SAMPLER
# (dpmpp2m-thresh), TRAIN_S (360), FD_EVERY_S (60), SEED (0).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=$(realpath -m "${WORK:-outputs/fair}")
PHASE=${PHASE:-train}
TRIALS=${TRIALS:-128:2e-4 128:4e-4 512:4e-4 512:8e-4 1024:6e-4 1024:1e-3}
SAMPLER=${SAMPLER:-dpmpp2m-thresh}
TRAIN_S=${TRAIN_S:-360}
FD_EVERY_S=${FD_EVERY_S:-60}
SEED=${SEED:-0}
ZIP=.data/cifar10-train.zip
exec > >(tee -a "$OUT/part1-tuning-$PHASE.log") 2>&1
mkdir -p "$WORK/tuning"
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl .unetbench/whl/*.whl 2>&1 | grep -v "^WARNING: Target"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__)"
echo "git $(git rev-parse --short HEAD 2>/dev/null); PHASE=$PHASE TRIALS='$TRIALS' SAMPLER=$SAMPLER TRAIN_S=$TRAIN_S SEED=$SEED"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$GPUS" -gt 0 ] || GPUS=1
jobs_run() {  # jobs_run "name: command" ...: one job per GPU, in waves; logs in $WORK/tuning/<name>.log
  local i=0 pids=() spec name
  for spec in "$@"; do
    name=${spec%%:*}
    ( export CUDA_VISIBLE_DEVICES=$(( i % GPUS )); t0=$(date +%s)
      bash -c "${spec#*:}" > "$WORK/tuning/$name.log" 2>&1
      echo "[$(date -u +%H:%M:%S)] $name (GPU $CUDA_VISIBLE_DEVICES): exit $?, $(( $(date +%s) - t0 )) s" ) &
    pids+=($!); i=$(( i + 1 ))
    if [ $(( i % GPUS )) = 0 ]; then wait "${pids[@]}"; pids=(); fi
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
}
pack() {
  tar -C "$WORK" -czf "$OUT/part1-tuning-$PHASE.tgz.tmp" --exclude='*.npz' --exclude='*.safetensors' tuning \
    ladder-tuning.json 2>/dev/null
  mv -f "$OUT/part1-tuning-$PHASE.tgz.tmp" "$OUT/part1-tuning-$PHASE.tgz"
}
for seed in 0 1; do   # the classifiers of the ladder (seed 0 also scores every in-run FD)
  d=$WORK/extractor-s$seed
  [ -f "$d/cifar10-resnet9.pt" ] || timeout 150 python3 experiments/feature_extractors/train_classifier.py \
    --data cifar10 --root "$ZIP" --out "$d" --workers 16 --seed "$seed" > "$WORK/tuning/classifier-s$seed.log" 2>&1
done

tag() { echo "b${1%%:*}-lr${1#*:}-s$SEED"; }
case $PHASE in
train)
  marks=$(python3 -c "print(','.join(str(round($FD_EVERY_S * k / 60, 4)) for k in range(1, int($TRAIN_S // $FD_EVERY_S) + 1)))")
  specs=()
  for trial in $TRIALS; do
    t=$(tag "$trial")
    specs+=("$t: python3 experiments/peer_ddpm/train_diffusers_ddpm.py --out $WORK/tuning/$t --data $ZIP --extractor-path $WORK/extractor-s0/cifar10-resnet9.pt --extractor-name cifar10-resnet9 --feature-layer pool --train-minutes $(python3 -c "print($TRAIN_S / 60)") --eval-at-minutes $marks --num-eval-samples 5000 --reference-cache $WORK/fid_reference --batch-size ${trial%%:*} --lr ${trial#*:} --sampler $SAMPLER --seed $SEED --save-ema $WORK/tuning/$t/ema.safetensors")
  done
  jobs_run "${specs[@]}"
  for trial in $TRIALS; do   # every trial, its curve and its speed
    t=$(tag "$trial")
    python3 -c "
import json, sys
r = json.load(open('$WORK/tuning/$t/result.json'))
print(f\"$t: {r['steps']} steps, {r['images_seen']} images, {r['train_images_per_s']:.0f} img/s (compile {r['compile_seconds']:.0f} s), \"
      f\"FD s0 by minute: {[round(e['fd'], 1) for e in r['evaluations'] if e['fd'] is not None]}\")" 2>/dev/null || echo "$t: no result"
  done ;;
score)
  specs=()
  for trial in $TRIALS; do
    t=$(tag "$trial")
    [ -f "$WORK/tuning/$t/ema.safetensors" ] && specs+=("sample-$t: python3 experiments/cifar10_fair/peer_samplers.py --weights $WORK/tuning/$t/ema.safetensors --out $WORK/tuning/$t/samples --samplers $SAMPLER --n 5000")
  done
  jobs_run "${specs[@]}"
  sets=()
  for trial in $TRIALS; do t=$(tag "$trial"); f=$WORK/tuning/$t/samples/$SAMPLER.npz; [ -f "$f" ] && sets+=("peer-$t=$f"); done
  python3 experiments/cifar10_fair/ladder.py --root "$ZIP" --extractor "s0=$WORK/extractor-s0/cifar10-resnet9.pt" \
    "s1=$WORK/extractor-s1/cifar10-resnet9.pt" --samples "${sets[@]}" --n 5000 --draws 5 --out "$WORK/ladder-tuning.json" ;;
*) echo "PHASE is train or score"; exit 2 ;;
esac
pack
ls -la "$OUT"
