#!/usr/bin/env bash
# Part 1 (sampler) and part 4 (ladder) of issue 27 on one GPU, in one call: train the diffusers peer as in the
# f sweep (batch 128, lr 2e-4, its EMA), save its EMA weights, sample them with every sampler of
# experiments/peer_ddpm SAMPLERS from the same noise, and score every sample set with both CIFAR-10 classifiers
# beside the ladder of degradations (ladder.py), in the same call.
#   TRAIN_MIN=6 bash experiments/cifar10_fair/run_part1_samplers.sh
# Carry .whl, .unetbench/whl and .data. The classifiers are taken from outputs/fair/extractor-s{0,1} when an
# earlier call on the same warm machine left them (run_part5.sh PART=classifier), else trained here first.
# Settings: TRAIN_MIN (6: the peer's training-time budget, compile included, as in the f sweep), SAMPLERS (all),
# LIMIT_S (570: the whole call; the sampler study stops early enough to leave LADDER_S, 60 s, for the ladder, about 40 s on an H100).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=$(realpath -m "${WORK:-outputs/fair}")
TRAIN_MIN=${TRAIN_MIN:-6}
tsec=$(python3 -c "print(int(float('$TRAIN_MIN') * 60))")
LADDER_S=${LADDER_S:-60}
SAMPLERS=${SAMPLERS:-dpmpp2m dpmpp2m-thresh ddim-clip dpmpp3m dpmpp3m-thresh unipc3 ddim ddpm-clip}
start=$(date +%s)
end=$(( start + ${LIMIT_S:-570} ))
left() { echo $(( end - $(date +%s) )); }
exec > >(tee -a "$OUT/part1.log") 2>&1
mkdir -p "$WORK/peer" "$WORK/samplers"
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl .unetbench/whl/*.whl 2>&1 | grep -v "^WARNING: Target"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__)"
echo "git $(git rev-parse --short HEAD 2>/dev/null); TRAIN_MIN=$TRAIN_MIN; samplers: $SAMPLERS"
pack() {
  tar -C "$WORK" -czf "$OUT/part1.tgz.tmp" --exclude='*.pt' --exclude='*.npz' --exclude='*.safetensors' \
    --exclude='fd_reference' peer samplers ladder.json extractor-s0/result.json extractor-s1/result.json 2>/dev/null
  mv -f "$OUT/part1.tgz.tmp" "$OUT/part1.tgz"
}

extractors=()
for seed in 0 1; do   # seed 1 only when it is already there or there is time for it (about 45 s)
  d=$WORK/extractor-s$seed
  if [ ! -f "$d/cifar10-resnet9.pt" ] && { [ "$seed" = 0 ] || [ "$(left)" -gt $(( tsec + 400 )) ]; }; then
    timeout 150 python3 experiments/feature_extractors/train_classifier.py --data cifar10 \
      --root .data/cifar10-train.zip --out "$d" --workers 16 --seed "$seed" > "$WORK/peer/classifier-s$seed.log" 2>&1
    echo "classifier seed $seed trained here: $(tail -3 "$WORK/peer/classifier-s$seed.log" | head -1)"
  fi
  [ -f "$d/cifar10-resnet9.pt" ] && extractors+=("s$seed=$d/cifar10-resnet9.pt")
done
echo "extractors: ${extractors[*]}"
[ ${#extractors[@]} -gt 0 ] || { echo "no classifier"; exit 1; }
s0=${extractors[0]#*=}

t0=$(date +%s)
timeout $(( tsec + 200 )) python3 experiments/peer_ddpm/train_diffusers_ddpm.py --out "$WORK/peer" \
  --data .data/cifar10-train.zip --extractor-path "$s0" --extractor-name cifar10-resnet9 --feature-layer pool \
  --train-minutes "$TRAIN_MIN" --eval-at-minutes "$TRAIN_MIN" --num-eval-samples 5000 \
  --reference-cache "$WORK/fid_reference" --save-ema "$WORK/peer/ema.safetensors" > "$WORK/peer/train.log" 2>&1
echo "peer: rc $?, $(( $(date +%s) - t0 )) s wall; $(grep -E 'done:' "$WORK/peer/train.log")"
pack

t0=$(date +%s)
python3 experiments/cifar10_fair/peer_samplers.py --weights "$WORK/peer/ema.safetensors" --out "$WORK/samplers" \
  --n 5000 --batch 1000 --samplers $SAMPLERS --deadline-s $(( $(left) - LADDER_S ))
echo "samplers: rc $?, $(( $(date +%s) - t0 )) s"
pack

sets=()
for f in "$WORK"/samplers/*.npz; do [ -f "$f" ] && sets+=("peer-$(basename "$f" .npz)=$f"); done
# the saved 64-sample grids of the f sweep's peer runs (DPM-Solver++(2M), no thresholding), scored at n = 64
for run in results results_h100_large_batch results_h200_no_gan; do
  sets+=("sweep-$run-peer-grid=grid:experiments/cifar10_f_sweep/$run/grids/peer-samples-final.png")
done
t0=$(date +%s)
timeout "$(( $(left) > 30 ? $(left) : 30 ))" python3 experiments/cifar10_fair/ladder.py --root .data/cifar10-train.zip \
  --extractor "${extractors[@]}" --samples "${sets[@]}" --n 5000 --draws 5 --workers 16 --out "$WORK/ladder.json"
echo "ladder: rc $?, $(( $(date +%s) - t0 )) s"
pack
cp "$WORK/ladder.json" "$WORK/samplers/samplers.json" "$WORK/peer/result.json" "$OUT/" 2>/dev/null
cp "$WORK/samplers/dpmpp2m.png" "$OUT/grid-dpmpp2m.png" 2>/dev/null
echo "total $(( $(date +%s) - start )) s"
ls -la "$OUT"
