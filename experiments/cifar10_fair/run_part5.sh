#!/usr/bin/env bash
# Part 5 of issue 27: the spread of our step ratios against the diffusers peers, on one GPU, in one call.
#   PART=unet bash experiments/cifar10_fair/run_part5.sh      # LDM-4 UNet step, ours compiled vs diffusers compiled
#   PART=ae   bash experiments/cifar10_fair/run_part5.sh      # kl-f4 pair, ours compiled vs diffusers compiled with
#                                                             # its classic attention processor (the stronger peer),
#                                                             # then, if time is left, diffusers as shipped (SDPA)
#   PART=ae-shipped ...                                       # kl-f4, ours vs diffusers as shipped (SDPA attention)
#   PART="classifier unet" ...                                # the two CIFAR-10 classifiers first (part 4's extractors)
# Carry .whl and .unetbench/whl (diffusers 0.42.1 + importlib_metadata); .data for the classifier part.
# Each repeat is its own peers.py process, ours and the peer alternating (ours r1, peer r1, ours r2, ...), so each
# ratio pairs two measurements minutes apart on the same card. Repeats 2 and 3 find repeat 1's compiled kernels
# in inductor's cache: they measure the run-to-run spread of the same kernels, not compile-to-compile variation.
# MFU is reported against the bf16 matmul measured in each process and against the datasheet's dense bf16 peak
# (summarize_perf.py). LIMIT_S (default 560) caps the whole call; a process that would start with less than its
# expected time left is skipped and named. Results: $OUT/part5.tgz (JSON + logs) and the summary at the end.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=$(realpath -m "${WORK:-outputs/fair}")   # git-ignored; kept while the machine stays warm
LOG=$WORK/part5
mkdir -p "$LOG"
REPEATS=${REPEATS:-3}
end=$(( $(date +%s) + ${LIMIT_S:-560} ))
left() { echo $(( end - $(date +%s) )); }
exec > >(tee -a "$OUT/part5.log") 2>&1
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl .unetbench/whl/*.whl 2>&1 | grep -v "^WARNING: Target"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
python3 -c "import torch, lightning, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__)"
echo "git $(git rev-parse --short HEAD 2>/dev/null)"
pack() { tar -C "$WORK" -czf "$OUT/part5.tgz.tmp" part5 extractor-s0/result.json extractor-s1/result.json 2>/dev/null; \
         mv -f "$OUT/part5.tgz.tmp" "$OUT/part5.tgz"; }

peer() {  # peer <tag> <expected s> <peers.py args...>: one process, skipped when its expected time is not left
  local tag=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "$tag: SKIPPED ($(left) s left, needs ~$need)"; return; fi
  local t0=$(date +%s)
  timeout "$(left)" python3 experiments/benchmarks/peers.py --steps 20 --warmup 3 --budget-s 0 \
    --out "$LOG/$tag.json" "$@" > "$LOG/$tag.log" 2>&1
  echo "$tag: rc $?, $(( $(date +%s) - t0 )) s; $(grep -E 'compiled +[0-9]' "$LOG/$tag.log" | head -1)"
  pack
}

for part in ${PART:-unet}; do case $part in
  classifier)   # part 4's two extractors: the recipe of every FD in cifar10_f_sweep, seeds 0 and 1
    for seed in 0 1; do
      d=$WORK/extractor-s$seed
      if [ -f "$d/cifar10-resnet9.pt" ]; then echo "classifier seed $seed: kept from an earlier call"; continue; fi
      t0=$(date +%s)
      timeout 150 python3 experiments/feature_extractors/train_classifier.py --data cifar10 \
        --root .data/cifar10-train.zip --out "$d" --workers 16 --seed "$seed" > "$LOG/classifier-s$seed.log" 2>&1
      echo "classifier seed $seed: rc $?, $(( $(date +%s) - t0 )) s; $(tail -3 "$LOG/classifier-s$seed.log" | head -1)"
    done
    pack ;;
  unet)
    for r in $(seq "${FIRST_REPEAT:-1}" "$REPEATS"); do
      first=$([ "$r" = 1 ] && echo 150 || echo 60)   # cold compile in the first process, cached after
      peer "unet-ours-r$r" "$first" --only unet_train/ours-compiled
      peer "unet-diffusers-r$r" "$first" --only unet_train/diffusers-compiled
    done ;;
  ae)
    for r in $(seq "${FIRST_REPEAT:-1}" "$REPEATS"); do
      first=$([ "$r" = 1 ] && echo 100 || echo 40)
      peer "ae-ours-r$r" "$first" --only ae_train/ours-compiled
      peer "ae-diffusers-classic-r$r" "$first" --only ae_train/diffusers-compiled --diffusers-attention classic
    done
    for r in $(seq "${FIRST_REPEAT:-1}" "$REPEATS"); do   # the peer as shipped (SDPA attention), far from the target: only if time is left
      first=$([ "$r" = 1 ] && echo 100 || echo 40)
      peer "ae-diffusers-sdpa-r$r" "$first" --only ae_train/diffusers-compiled
    done ;;
  ae-shipped)   # ours against diffusers as shipped (SDPA attention), alternating, without the classic peer
    for r in $(seq "${FIRST_REPEAT:-1}" "$REPEATS"); do
      first=$([ "$r" = 1 ] && echo 100 || echo 40)
      peer "ae-ours-r$r" "$first" --only ae_train/ours-compiled
      peer "ae-diffusers-sdpa-r$r" "$first" --only ae_train/diffusers-compiled
    done ;;
  *) echo "PART lists classifier, unet, ae, ae-shipped"; exit 2 ;;
esac; done
pack
python3 experiments/cifar10_fair/summarize_perf.py "$LOG" | tee "$LOG/summary.md"
pack
ls -la "$OUT"
