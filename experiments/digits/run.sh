#!/usr/bin/env bash
# The whole pipeline on the embedded MNIST digits (5,000 digits, 500 held out), on ONE GPU:
#   classifier  the digits-resnet9 feature extractor (experiments/feature_extractors), training split only
#   ae          stage 1, experiment=digits-autoencoder (KL f=2), capped at AE_MAX_TIME of wall time
#   eval-ae     stage=evaluate of its export on the 500 held-out digits: PSNR, SSIM, rfd-digits-resnet9@500
#   ldm         stage 2, experiment=digits-ldm on that export for TRAIN_SECONDS of training time, FD of 500
#               samples against the 500 held-out digits every TRAIN_SECONDS/5 s of training time and at the end
#   sample      a 10x10 grid of class-conditional samples from the final checkpoint (column c = digit c)
# Usage (repo root; wheels in .whl; the caller sets CUDA_VISIBLE_DEVICES to one GPU and OUT):
#   bash experiments/digits/run.sh                  # every phase, in this order
#   bash experiments/digits/run.sh ldm sample       # or phases by name (each starts its own run afresh)
# Environment: OUT (/tmp/out: digits.log and digits.tgz land there), WORK (outputs/digits, ignored by git),
# TRAIN_SECONDS (150), FD_EVERY_SECONDS (TRAIN_SECONDS/5), FD_SAMPLES (500 = every held-out digit),
# AE_MAX_TIME (00:00:01:30, Lightning's DD:HH:MM:SS), SAMPLE_GUIDANCE (1.0), SITE (/tmp/site: where the wheels
# go; first on PYTHONPATH, then src, then the caller's PYTHONPATH), SKIP_INSTALL=1 (the wheels are already in
# SITE), SMOKE=1 (a CPU check of every command line: tiny sizes, about 2 minutes; the numbers mean nothing).
set -uo pipefail   # no -e: a failed phase is reported and the next one still runs
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then d_seconds=20 d_samples=24; else d_seconds=150 d_samples=500; fi
TRAIN_SECONDS=${TRAIN_SECONDS:-$d_seconds}
FD_EVERY_SECONDS=${FD_EVERY_SECONDS:-$(python3 -c "print(f'{$TRAIN_SECONDS / 5:g}')")}
FD_SAMPLES=${FD_SAMPLES:-$d_samples}
AE_MAX_TIME=${AE_MAX_TIME:-00:00:01:30}
SAMPLE_GUIDANCE=${SAMPLE_GUIDANCE:-1.0}
SITE=${SITE:-/tmp/site}
WORK=$(realpath -m "${WORK:-outputs/digits}")
NAME=digits-resnet9
BUNDLE=$WORK/extractor/$NAME.pt
EXPORT=$WORK/autoencoder/digits-ae/export/autoencoder.safetensors
LDM_CKPT=$WORK/diffusion/digits-ldm/checkpoints/last.ckpt
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(classifier ae eval-ae ldm sample)
exec > >(tee -a "$OUT/digits.log") 2>&1   # the log lands in $OUT as it grows: it comes back even if the call is cut
mkdir -p "$WORK/results"
t0=$(date +%s)

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  s=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  echo "=== install: exit $?, $(( $(date +%s) - s )) s wall"
fi
export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1   # the wheels first
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda devices', torch.cuda.device_count())"
echo "phases: ${phases[*]}; TRAIN_SECONDS=$TRAIN_SECONDS FD_EVERY_SECONDS=$FD_EVERY_SECONDS FD_SAMPLES=$FD_SAMPLES" \
     "AE_MAX_TIME=$AE_MAX_TIME CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset} SMOKE=$SMOKE WORK=$WORK"

# SMOKE=1 only: what shrinks each command to seconds on a CPU.
smoke_all=(); smoke_ae=(); smoke_ldm=(); smoke_eval=(); smoke_sample=(); smoke_script=()
if [ "$SMOKE" = 1 ]; then
  smoke_all=(trainer=cpu data.batch_size=16 trainer.limit_val_batches=1)
  smoke_ae=(max_steps=20 loss.disc_start=10 trainer.val_check_interval=10)
  smoke_ldm=(data.batch_size=4 unet=tiny module.cache_latents=false module.sampling.steps=2 module.num_log_images=10
             module.scale_estimation_batches=2 trainer.val_check_interval=50 callbacks.fid.batch_size=24
             callbacks.fid.reference_num_images=100)
  smoke_eval=(evaluate.num_samples=64 evaluate.batch_size=32 evaluate.accelerator=cpu)
  smoke_sample=(sample.accelerator=cpu sample.steps=2)
  smoke_script=(--dry-run)
fi

seconds() { IFS=: read -r d h m s <<< "$1"; echo $(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s )); }
clock() { printf '00:%02d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }   # -> DD:HH:MM:SS
collect() {   # the files worth reading first, flat in results/ (copies; the run folders stay as they are)
  local r=$WORK/results f
  cp -f "$WORK/extractor/result.json" "$r/extractor-result.json" 2>/dev/null
  cp -f "$WORK/autoencoder/digits-ae/csv/metrics.csv" "$r/ae-metrics.csv" 2>/dev/null
  cp -f "$WORK/diffusion/digits-ldm/csv/metrics.csv" "$r/ldm-metrics.csv" 2>/dev/null
  cp -f "$WORK/sample/digits-samples/grid.png" "$r/samples-grid-10x10.png" 2>/dev/null
  f=$(ls "$WORK"/autoencoder/digits-ae/images/*.png 2>/dev/null | sort | tail -1) && [ -n "$f" ] && cp -f "$f" "$r/ae-reconstructions.png"
  f=$(ls "$WORK"/diffusion/digits-ldm/images/val_samples_*.png 2>/dev/null | sort | tail -1) && [ -n "$f" ] && cp -f "$f" "$r/ldm-val-samples-last.png"
  f=$(ls "$WORK"/diffusion/digits-ldm/images/val_fid_samples_*.png 2>/dev/null | sort | tail -1) && [ -n "$f" ] && cp -f "$f" "$r/ldm-fd-samples-last.png"
  return 0
}
pack() {   # every small result so far (never checkpoints, exports, bundles, caches) -> $OUT/digits.tgz, atomically
  collect
  tar -C "$WORK" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npz' \
    --exclude='*.pth' --exclude='*.npy' --exclude='latent_cache' --exclude='fid_reference' --exclude='wandb' \
    -czf "$OUT/digits.tgz.tmp" . 2>/dev/null && mv -f "$OUT/digits.tgz.tmp" "$OUT/digits.tgz"
}
# Also every 30 s in the background: if the call is cut at its limit, what was done so far still comes back.
( while sleep 30; do pack; done ) &
packer=$!
common=(data=digits logger=csv "paths.output_root=$WORK" callbacks.progress=null +trainer.enable_progress_bar=false)
fd_spec() { for p in "$@"; do fd_args+=("$p.feature_extractor.kind=checkpoint" "$p.feature_extractor.name=$NAME"
  "$p.feature_extractor.path=$BUNDLE" "$p.feature_extractor.feature_layer=pool"); done; }
fd_args=(); fd_spec evaluate; fd_eval=("${fd_args[@]}")
fd_args=(); fd_spec callbacks.fid; fd_ldm=("${fd_args[@]}")
need() { [ -f "$1" ] || { echo "SKIPPED: no $1 ($2)"; return 1; }; }

for phase in "${phases[@]}"; do
  start=$(date +%s)
  echo "=== $phase ($(date -u +%H:%M:%S) UTC, $(( start - t0 )) s since the start)"
  case "$phase" in
    classifier)
      rm -rf "$WORK/extractor"
      timeout 150 python3 experiments/feature_extractors/train_classifier.py --data digits --name "$NAME" \
        --out "$WORK/extractor" "${smoke_script[@]}" ;;
    ae)
      rm -rf "$WORK/autoencoder/digits-ae"
      timeout --signal=TERM $(( $(seconds "$AE_MAX_TIME") + 150 )) python3 -m lightning_ldm \
        experiment=digits-autoencoder "${common[@]}" run_name=digits-ae "+trainer.max_time=$AE_MAX_TIME" \
        "${smoke_all[@]}" "${smoke_ae[@]}" ;;
    eval-ae)   # PSNR, SSIM and rFD of all 500 held-out digits through the export
      need "$BUNDLE" "run the classifier phase" && need "$EXPORT" "run the ae phase" && {
        rm -rf "$WORK/evaluate/digits-ae-eval"
        timeout 150 python3 -m lightning_ldm stage=evaluate "evaluate.ckpt=$EXPORT" data=digits logger=csv \
          "paths.output_root=$WORK" run_name=digits-ae-eval evaluate.split=val evaluate.num_samples=500 \
          evaluate.batch_size=500 "${fd_eval[@]}" "evaluate.report=$WORK/results/ae-eval.json" \
          "${smoke_eval[@]}"; } ;;
    ldm)
      need "$BUNDLE" "run the classifier phase" && need "$EXPORT" "run the ae phase" && {
        rm -rf "$WORK/diffusion/digits-ldm"
        timeout --signal=TERM $(( TRAIN_SECONDS + 210 )) python3 -m lightning_ldm experiment=digits-ldm \
          "autoencoder.path=$EXPORT" "${common[@]}" run_name=digits-ldm max_steps=100000000 \
          "max_train_seconds=$TRAIN_SECONDS" "+trainer.max_time=$(clock $(( TRAIN_SECONDS + 180 )))" \
          callbacks=fid callbacks.best_fid=null callbacks.fid.every_n_steps=0 \
          "callbacks.fid.every_n_train_seconds=$FD_EVERY_SECONDS" callbacks.fid.reference_split=val \
          "callbacks.fid.num_samples=$FD_SAMPLES" callbacks.fid.batch_size=500 "${fd_ldm[@]}" \
          "${smoke_all[@]}" "${smoke_ldm[@]}"; } ;;
    sample)   # seed i has class i mod 10: a 10-wide grid has one digit class per column
      need "$LDM_CKPT" "run the ldm phase" && {
        rm -rf "$WORK/sample/digits-samples"
        timeout 150 python3 -m lightning_ldm stage=sample "sample.ckpt=$LDM_CKPT" "paths.output_root=$WORK" \
          run_name=digits-samples sample.num_samples=100 sample.batch_size=100 sample.grid_size=100 \
          sample.format=npz sample.compile=false "sample.guidance_scale=$SAMPLE_GUIDANCE" "${smoke_sample[@]}"; } ;;
    *) echo "unknown phase $phase (classifier ae eval-ae ldm sample)"; false ;;
  esac
  rc=$?
  echo "=== $phase: exit $rc, $(( $(date +%s) - start )) s wall"
  pack
done
[ -f "$BUNDLE" ] && sha256sum "$BUNDLE" > "$WORK/results/extractor.sha256"
kill "$packer" 2>/dev/null
wait "$packer" 2>/dev/null
echo "=== all: $(( $(date +%s) - t0 )) s wall"
python3 experiments/digits/summary.py "$WORK" > "$WORK/results/summary.txt" 2>&1
cat "$WORK/results/summary.txt"
pack
ls -la "$OUT"
sleep 1   # let tee write the last lines into the log
