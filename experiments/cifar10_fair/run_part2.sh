#!/usr/bin/env bash
# Parts 2 and 3 of issue 27: the CIFAR-10 comparison at equal TOTAL GPU time, with seeds, scored with both
# classifiers beside the ladder. Three phases, each one device call on one machine (it must stay warm between
# them: the phases share WORK); every job runs on its own GPU, in waves when there are more jobs than GPUs.
#   PHASE=prep  bash experiments/cifar10_fair/run_part2.sh   # classifiers; per seed: stage 1 on the budget, the
#                                                            # free (preset) stage 1, the latent cache timed
#   PHASE=train bash experiments/cifar10_fair/run_part2.sh   # per seed: f=2 at equal total time, f=2 with the
#                                                            # autoencoder given for free, pixel space, the peer
#   PHASE=score bash experiments/cifar10_fair/run_part2.sh   # 5,000 samples of every run, ladder.py, the table
# Carry .whl, .unetbench/whl and .data. About 4 / 10 / 5 minutes with 8 GPUs and two seeds (4 GPUs: run
# PHASE=train once per seed, SEEDS=0 then SEEDS=1).
# Budget accounting, written to $WORK/budget-s<seed>.json and printed: TOTAL_S (360) = stage-1 training time
# (the module's clock, torch.compile included, stopped by max_train_seconds=STAGE1_S) + latent caching (wall time
# of the encoding pass) + stage-2 training time (the rest). Start-up, data loading, validation, FD evaluations and
# the export are outside every side's budget alike; the peer and pixel space have no stage 1 and no cache.
# Settings: SEEDS ("0 1"), TOTAL_S (360), STAGE1_S (120), FD_EVERY_S (60), PEER_BATCH / PEER_LR / PEER_SAMPLER (the
# tuned peer of run_part1_tuning.sh; defaults 128 / 2e-4 / dpmpp2m-thresh), OURS_BATCH (1024) / OURS_LR (6e-4),
# PIXEL_BATCH (512) / PIXEL_LR (4e-4), SMOKE=1 (CPU check of the command lines, meaningless numbers).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export WORK=$(realpath -m "${WORK:-outputs/fair}")
PHASE=${PHASE:-prep}
SEEDS=${SEEDS:-0 1}
TOTAL_S=${TOTAL_S:-360}
STAGE1_S=${STAGE1_S:-120}
FD_EVERY_S=${FD_EVERY_S:-60}
PEER_BATCH=${PEER_BATCH:-128} PEER_LR=${PEER_LR:-2e-4} PEER_SAMPLER=${PEER_SAMPLER:-dpmpp2m-thresh}
OURS_BATCH=${OURS_BATCH:-1024} OURS_LR=${OURS_LR:-6e-4} PIXEL_BATCH=${PIXEL_BATCH:-512} PIXEL_LR=${PIXEL_LR:-4e-4}
ZIP=.data/cifar10-train.zip
SWEEP=experiments/cifar10_f_sweep/run.sh
exec > >(tee -a "$OUT/part2-$PHASE.log") 2>&1
mkdir -p "$WORK/jobs"
if [ "${SKIP_INSTALL:-0}" != 1 ] && [ "${SMOKE:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .unetbench/whl/*.whl 2>&1 | grep -v "^WARNING: Target"
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SKIP_INSTALL=1 CIFAR10_ZIP=$ZIP
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
echo "git $(git rev-parse --short HEAD 2>/dev/null); PHASE=$PHASE SEEDS='$SEEDS' TOTAL_S=$TOTAL_S STAGE1_S=$STAGE1_S"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$GPUS" -gt 0 ] || GPUS=1

jobs_run() {  # jobs_run "name: command" ...: one job per GPU, in waves; logs in $WORK/jobs/<name>.log
  local i=0 pids=() spec name
  for spec in "$@"; do
    name=${spec%%:*}
    ( export CUDA_VISIBLE_DEVICES=$(( i % GPUS )) OUT=$WORK/jobs/$name; mkdir -p "$OUT"; t0=$(date +%s)
      bash -c "${spec#*:}" > "$WORK/jobs/$name.log" 2>&1
      echo "[$(date -u +%H:%M:%S)] $name (GPU $CUDA_VISIBLE_DEVICES): exit $?, $(( $(date +%s) - t0 )) s" ) &
    pids+=($!); i=$(( i + 1 ))
    if [ $(( i % GPUS )) = 0 ]; then wait "${pids[@]}"; pids=(); fi
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
}
pack() {
  tar -C "$WORK" -czf "$OUT/part2-$PHASE.tgz.tmp" --exclude='*.pt' --exclude='*.ckpt' --exclude='*.safetensors' \
    --exclude='*.npz' --exclude='latent_cache' --exclude='fid_reference' --exclude='wandb' . 2>/dev/null
  mv -f "$OUT/part2-$PHASE.tgz.tmp" "$OUT/part2-$PHASE.tgz"
}
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }

case $PHASE in
prep)
  # Classifier seed 0 where run.sh looks for it (it scores every in-run FD), seed 1 beside it for the rescoring.
  [ -d "$WORK/extractor-s0" ] && [ ! -e "$WORK/extractor" ] && ln -s extractor-s0 "$WORK/extractor"
  specs=()
  if [ ! -f "$WORK/extractor/cifar10-resnet9.pt" ]; then   # .training: run.sh's evaluations wait for the file
    mkdir -p "$WORK/extractor" && touch "$WORK/extractor/.training"
    specs+=("classifier-s0: python3 experiments/feature_extractors/train_classifier.py --data cifar10 --root $ZIP --out $WORK/extractor --workers 8 --seed 0; rm -f $WORK/extractor/.training")
  fi
  [ -f "$WORK/extractor-s1/cifar10-resnet9.pt" ] || specs+=("classifier-s1: python3 experiments/feature_extractors/train_classifier.py --data cifar10 --root $ZIP --out $WORK/extractor-s1 --workers 8 --seed 1")
  for s in $SEEDS; do
    specs+=("ae-budget-s$s: AE_NAME=ae-f2-budget-s$s AE_OVERRIDES='max_train_seconds=$STAGE1_S max_steps=1000000 seed=$s' WORK=$WORK bash $SWEEP ae-f2 eval-ae-f2")
    specs+=("ae-free-s$s: AE_NAME=ae-f2-free-s$s AE_OVERRIDES='seed=$s' WORK=$WORK bash $SWEEP ae-f2 eval-ae-f2")
  done
  jobs_run "${specs[@]}"
  # The latent cache of each budget export, built and timed here; the stage-2 runs of PHASE=train reuse it.
  for s in $SEEDS; do
    export_file=$WORK/autoencoder/ae-f2-budget-s$s/export/autoencoder.safetensors
    [ -f "$export_file" ] || { echo "seed $s: no budget export"; continue; }
    python3 -m lightning_ldm experiment=cifar10-ldm "autoencoder.path=$export_file" run_name=cache-s$s logger=csv \
      "paths.output_root=$WORK" "data.root=$ZIP" data.num_workers=8 ++data.verify=false callbacks.progress=null \
      +trainer.enable_progress_bar=false max_steps=1 "data.batch_size=$OURS_BATCH" "seed=$s" 2>&1 | stamp \
      > "$WORK/jobs/cache-s$s.log"
    python3 - "$WORK" "$s" "$TOTAL_S" "$STAGE1_S" <<'EOF'
import csv, json, sys
from pathlib import Path
work, seed, total, stage1_cap = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
lines = (work / "jobs" / f"cache-s{seed}.log").read_text().splitlines()
at = [i for i, l in enumerate(lines) if "Latent cache: encoding" in l]
cache = float(lines[at[0] + 1].split()[0]) - float(lines[at[0]].split()[0]) if at and at[0] + 1 < len(lines) else None
seconds = []
for f in (work / "autoencoder" / f"ae-f2-budget-s{seed}").rglob("metrics.csv"):
    seconds += [float(r["perf/train_seconds"]) for r in csv.DictReader(open(f)) if r.get("perf/train_seconds")]
stage1 = max([stage1_cap, *seconds])  # charge at least the cap: the clock stops at the first check past it
stage2 = total - stage1 - (cache or 0.0)
budget = {"seed": int(seed), "total_seconds": total, "stage1_train_seconds": stage1,
          "stage1_train_seconds_logged": max(seconds) if seconds else None, "latent_cache_seconds": cache,
          "stage2_train_seconds": stage2,
          "not_counted": "start-up, data loading, validation, FD evaluations, the export (alike for every side)"}
(work / f"budget-s{seed}.json").write_text(json.dumps(budget, indent=1) + "\n")
print(f"seed {seed}: stage 1 {stage1:.1f} s + latent cache {cache if cache is None else round(cache, 1)} s "
      f"+ stage 2 {stage2:.1f} s = {total:.0f} s total")
EOF
  done ;;
train)
  [ -d "$WORK/extractor-s0" ] && [ ! -e "$WORK/extractor" ] && ln -s extractor-s0 "$WORK/extractor"
  specs=()
  for s in $SEEDS; do
    stage2=$(python3 -c "import json; print(round(json.load(open('$WORK/budget-s$s.json'))['stage2_train_seconds']))") \
      || { echo "seed $s: no budget (run PHASE=prep)"; continue; }
    common="data.batch_size=$OURS_BATCH module.lr=$OURS_LR seed=$s"
    specs+=("f2-total-s$s: AE_NAME=ae-f2-budget-s$s TRAIN_SECONDS=$stage2 FD_EVERY_SECONDS=$FD_EVERY_S STAGE2_OVERRIDES='$common run_name=f2-total-s$s' WORK=$WORK bash $SWEEP ldm-f2")
    specs+=("f2-free-s$s: AE_NAME=ae-f2-free-s$s TRAIN_SECONDS=$TOTAL_S FD_EVERY_SECONDS=$FD_EVERY_S STAGE2_OVERRIDES='$common run_name=f2-free-s$s' WORK=$WORK bash $SWEEP ldm-f2")
    specs+=("pixel-s$s: TRAIN_SECONDS=$TOTAL_S FD_EVERY_SECONDS=$FD_EVERY_S STAGE2_OVERRIDES='data.batch_size=$PIXEL_BATCH module.lr=$PIXEL_LR seed=$s run_name=pixel-s$s' WORK=$WORK bash $SWEEP pixel")
    marks=$(python3 -c "print(','.join(str(round($FD_EVERY_S * k / 60, 4)) for k in range(1, int($TOTAL_S // $FD_EVERY_S) + 1)))")
    specs+=("peer-s$s: python3 experiments/peer_ddpm/train_diffusers_ddpm.py --out $WORK/peer-s$s --data $ZIP --extractor-path $WORK/extractor/cifar10-resnet9.pt --extractor-name cifar10-resnet9 --feature-layer pool --train-minutes $(python3 -c "print($TOTAL_S / 60)") --eval-at-minutes $marks --num-eval-samples 5000 --reference-cache $WORK/fid_reference --batch-size $PEER_BATCH --lr $PEER_LR --sampler $PEER_SAMPLER --seed $s --save-ema $WORK/peer-s$s/ema.safetensors")
  done
  jobs_run "${specs[@]}" ;;
score)
  specs=()
  for s in $SEEDS; do
    for run in f2-total-s$s f2-free-s$s pixel-s$s; do
      ckpt=$(find "$WORK" -path "*/$run/*" -name last.ckpt | head -1)
      [ -n "$ckpt" ] || { echo "$run: no last.ckpt"; continue; }
      specs+=("sample-$run: python3 -m lightning_ldm stage=sample sample.ckpt=$ckpt sample.num_samples=5000 sample.batch_size=1000 sample.format=npz sample.output_dir=$WORK/samples/$run logger=csv paths.output_root=$WORK run_name=sample-$run")
    done
    specs+=("sample-peer-s$s: python3 experiments/cifar10_fair/peer_samplers.py --weights $WORK/peer-s$s/ema.safetensors --out $WORK/samples/peer-s$s --samplers $PEER_SAMPLER --n 5000")
  done
  jobs_run "${specs[@]}"
  sets=()
  for f in "$WORK"/samples/*/samples_rank0.npz; do [ -f "$f" ] && sets+=("$(basename "$(dirname "$f")")=$f"); done
  for s in $SEEDS; do f=$WORK/samples/peer-s$s/$PEER_SAMPLER.npz; [ -f "$f" ] && sets+=("peer-s$s=$f"); done
  python3 experiments/cifar10_fair/ladder.py --root "$ZIP" --extractor "s0=$WORK/extractor/cifar10-resnet9.pt" \
    "s1=$WORK/extractor-s1/cifar10-resnet9.pt" --samples "${sets[@]}" --n 5000 --draws 5 --out "$WORK/ladder-part2.json"
  python3 experiments/cifar10_fair/summarize_fair.py "$WORK" | tee "$WORK/part2-table.md" ;;
*) echo "PHASE is prep, train or score"; exit 2 ;;
esac
pack
ls -la "$OUT"
