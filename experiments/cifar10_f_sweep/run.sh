#!/usr/bin/env bash
# Issue 7, the CIFAR-10 f sweep: pixel space (f=1) against KL latents f=2 and f=4 for the same training-time
# budget, FD against the held-out images with the domain classifier, and diffusers' DDPM as a peer.
# Usage on the GPU machine (repo root; wheels in .whl or .fsweep/whl; the zip at .data/cifar10-train.zip):
#   bash experiments/cifar10_f_sweep/run.sh call1     # classifier, stage 2 in pixel space, diffusers peer
#   bash experiments/cifar10_f_sweep/run.sh call2     # stage 1 KL f=4 (+ evaluate), stage 2 on its latents
#   bash experiments/cifar10_f_sweep/run.sh call3     # stage 1 KL f=2 (+ evaluate), stage 2 on its latents
# or phases by name: classifier pixel peer ae-f4 eval-ae-f4 ldm-f4 ae-f2 eval-ae-f2 ldm-f2
# README.md beside this file has the plan, the time estimates and the exact device calls.
# Settings (environment): TRAIN_SECONDS (360: each stage-2 run's training-time budget, and the peer's),
# FD_EVERY_SECONDS (TRAIN_SECONDS / 6: FD every this much training time), FD_SAMPLES (5000), AE_MAX_TIME
# (00:00:03:30: wall-clock cap of each stage-1 run), STAGE2_OVERRIDES (extra Hydra overrides for every stage-2
# run, space-separated, e.g. "data.batch_size=512 module.lr=8e-4"), AE_OVERRIDES (the same for stage 1, e.g.
# "loss.disc_start=2000": the discriminator from batch 2000; the presets train without it), AE_NAME (the stage-1 run that ae-*, eval-ae-* and ldm-* use; default
# ae-f2 / ae-f4), SKIP_INSTALL=1 (wheels already installed),
# SMOKE=1 (a CPU check of every command line: tiny sizes, seconds per phase; results are meaningless).
# Phases may run at once on different GPUs of one machine (experiments/parallel.sh): they share WORK, and a phase
# that needs the classifier waits up to 3 min for the classifier phase to write it.
set -uo pipefail   # no -e: a failed phase is reported and the next one still runs
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then d_seconds=20 d_samples=24; else d_seconds=360 d_samples=5000; fi
TRAIN_SECONDS=${TRAIN_SECONDS:-$d_seconds}
FD_EVERY_SECONDS=${FD_EVERY_SECONDS:-$(python3 -c "print($TRAIN_SECONDS / 6)")}
FD_SAMPLES=${FD_SAMPLES:-$d_samples}
AE_MAX_TIME=${AE_MAX_TIME:-00:00:03:30}
ZIP=${CIFAR10_ZIP:-.data/cifar10-train.zip}
WORK=$(realpath -m "${WORK:-outputs/f_sweep}")   # ignored by git: kept between calls while the machine stays warm
NAME=cifar10-resnet9
phases=("$@")
[ ${#phases[@]} -eq 0 ] && { echo "usage: run.sh call1|call2|call3|<phase>..."; exit 2; }
case "${phases[0]}" in
  call1) tag=call1; phases=(classifier pixel peer) ;;
  call2) tag=call2; phases=(ae-f4 eval-ae-f4 ldm-f4) ;;
  call3) tag=call3; phases=(ae-f2 eval-ae-f2 ldm-f2) ;;
  *) tag=$(IFS=-; echo "${phases[*]}") ;;
esac
exec > >(tee -a "$OUT/$tag.log") 2>&1   # the log lands in $OUT as it grows: it comes back even if the call is cut
mkdir -p "$WORK/results"

wheels=(); for w in .whl/*.whl .fsweep/whl/*.whl; do [ -f "$w" ] && wheels+=("$w"); done
[[ " ${phases[*]} " == *" peer "* ]] && for w in .unetbench/whl/*.whl; do [ -f "$w" ] && wheels+=("$w"); done
[ "$SMOKE" != 1 ] && [ "${SKIP_INSTALL:-0}" != 1 ] && [ ${#wheels[@]} -gt 0 ] && python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
echo "phases: ${phases[*]}; TRAIN_SECONDS=$TRAIN_SECONDS FD_EVERY_SECONDS=$FD_EVERY_SECONDS FD_SAMPLES=$FD_SAMPLES AE_MAX_TIME=$AE_MAX_TIME"

# SMOKE=1 only: what shrinks each command to seconds on a CPU.
smoke_all=(); smoke_ae=(); smoke_ldm=(); smoke_eval=(); smoke_script=()
if [ "$SMOKE" = 1 ]; then
  smoke_all=(trainer=cpu data.batch_size=16 data.num_workers=2 trainer.val_check_interval=10 trainer.limit_val_batches=1)
  smoke_ae=(max_steps=20 loss.disc_start=10)
  smoke_ldm=(unet=tiny module.cache_latents=false module.sampling.steps=2 module.num_log_images=4
             module.scale_estimation_batches=2 callbacks.fid.batch_size=24 callbacks.fid.reference_num_images=200)
  smoke_eval=(evaluate.num_samples=64 evaluate.batch_size=32 evaluate.accelerator=cpu)
  smoke_script=(--dry-run)
fi

clock() { printf '00:00:%02d:%02d' $(($1 / 60)) $(($1 % 60)); }   # seconds -> Lightning's DD:HH:MM:SS
extractor() {   # the classifier bundle: trained on this machine (warm, or by a phase running beside this one)
  local f _   # or carried in .fsweep/ from an earlier call
  for _ in $(seq 90); do
    for f in "$WORK/extractor/$NAME.pt" "$PWD/.fsweep/$NAME.pt"; do [ -f "$f" ] && { echo "$f"; return 0; }; done
    [ -f "$WORK/extractor/.training" ] || return 1
    sleep 2
  done
  return 1
}
pack() {   # every small result so far (never checkpoints, exports, bundles, caches) -> $OUT/<tag>.tgz, atomically
  tar -C "$WORK" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npz' \
    --exclude='latent_cache' --exclude='wandb' -czf "$OUT/$tag.tgz.tmp" . 2>/dev/null \
    && mv -f "$OUT/$tag.tgz.tmp" "$OUT/$tag.tgz"
}
# Also every 30 s in the background: if the call is cut at its limit, what was done so far still comes back.
( while sleep 30; do pack; done ) &
packer=$!
common=(logger=csv "paths.output_root=$WORK" "data.root=$ZIP" data.num_workers=8 ++data.verify=false
        callbacks.progress=null +trainer.enable_progress_bar=false)
stage2() {   # stage 2 for TRAIN_SECONDS of training time, FD against the held-out split every FD_EVERY_SECONDS
  local bundle
  bundle=$(extractor) || { echo "SKIPPED: no $NAME.pt (run the classifier phase, or carry .fsweep)"; return 1; }
  timeout --signal=TERM $((TRAIN_SECONDS + 300)) python3 -m lightning_ldm "$@" "${common[@]}" max_steps=100000000 \
    "max_train_seconds=$TRAIN_SECONDS" \
    "+trainer.max_time=$(clock $((TRAIN_SECONDS + 240)))" \
    callbacks=fid callbacks.fid.every_n_steps=0 "callbacks.fid.every_n_train_seconds=$FD_EVERY_SECONDS" \
    "callbacks.fid.num_samples=$FD_SAMPLES" \
    callbacks.fid.batch_size=1000 callbacks.fid.reference_split=val callbacks.best_fid=null \
    callbacks.fid.feature_extractor.kind=checkpoint "callbacks.fid.feature_extractor.name=$NAME" \
    "callbacks.fid.feature_extractor.path=$bundle" callbacks.fid.feature_extractor.feature_layer=pool \
    "${smoke_all[@]}" "${smoke_ldm[@]}" ${STAGE2_OVERRIDES:-}
}

for phase in "${phases[@]}"; do
  start=$(date +%s)
  echo "=== $phase ($(date -u +%H:%M:%S) UTC)"
  case "$phase" in
    classifier)
      mkdir -p "$WORK/extractor" && touch "$WORK/extractor/.training"   # phases beside this one wait for it
      timeout 240 python3 experiments/feature_extractors/train_classifier.py --data cifar10 --root "$ZIP" \
        --out "$WORK/extractor" --workers 16 "${smoke_script[@]}" \
        && cp "$WORK/extractor/$NAME.pt" "$OUT/$NAME.pt"   # 12.6 MiB: returned, to carry into later calls
      rm -f "$WORK/extractor/.training" ;;
    pixel) stage2 experiment=cifar10-pixel run_name=pixel ;;
    ldm-f2|ldm-f4)
      f=${phase#ldm-}
      export_file="$WORK/autoencoder/${AE_NAME:-ae-$f}/export/autoencoder.safetensors"
      if [ -f "$export_file" ]; then stage2 experiment=cifar10-ldm "autoencoder.path=$export_file" "run_name=ldm-$f"
      else echo "SKIPPED: no $export_file (run ae-$f first, in this call or on this warm machine)"; false; fi ;;
    ae-f2|ae-f4)
      f=${phase#ae-}
      timeout --signal=TERM 420 python3 -m lightning_ldm "experiment=cifar10-autoencoder-kl-$f" "${common[@]}" \
        "run_name=${AE_NAME:-ae-$f}" "+trainer.max_time=$AE_MAX_TIME" "${smoke_all[@]}" "${smoke_ae[@]}" \
        ${AE_OVERRIDES:-} ;;
    eval-ae-f2|eval-ae-f4)   # PSNR, SSIM and rFD of all 5,000 held-out images through the export
      f=${phase#eval-ae-}
      if bundle=$(extractor); then
        timeout 180 python3 -m lightning_ldm stage=evaluate \
          "evaluate.ckpt=$WORK/autoencoder/${AE_NAME:-ae-$f}/export/autoencoder.safetensors" logger=csv \
          "paths.output_root=$WORK" "run_name=eval-${AE_NAME:-ae-$f}" data=folder "data.root=$ZIP" data.channels=3 \
          data.num_workers=8 ++data.verify=false \
          evaluate.split=val evaluate.num_samples=5000 evaluate.batch_size=500 \
          evaluate.feature_extractor.kind=checkpoint "evaluate.feature_extractor.name=$NAME" \
          "evaluate.feature_extractor.path=$bundle" evaluate.feature_extractor.feature_layer=pool \
          "evaluate.report=$WORK/results/${AE_NAME:-ae-$f}-eval.json" "${smoke_eval[@]}"
      else echo "SKIPPED: no $NAME.pt"; false; fi ;;
    peer)
      if bundle=$(extractor); then
        marks=$(python3 -c "t, e = $TRAIN_SECONDS, $FD_EVERY_SECONDS; print(','.join(f'{e * k / 60:.4g}' for k in range(1, int(t // e + 1e-9) + 1)))")
        timeout --signal=TERM $((TRAIN_SECONDS + 300)) python3 experiments/peer_ddpm/train_diffusers_ddpm.py \
          --out "$WORK/peer_ddpm" --data "$ZIP" --extractor-path "$bundle" --extractor-name "$NAME" \
          --feature-layer pool --train-minutes "$(python3 -c "print($TRAIN_SECONDS / 60)")" \
          --eval-at-minutes "$marks" --num-eval-samples "$FD_SAMPLES" --reference-cache "$WORK/fid_reference" \
          "${smoke_script[@]}"
      else echo "SKIPPED: no $NAME.pt"; false; fi ;;
    *) echo "unknown phase $phase"; false ;;
  esac
  rc=$?
  echo "=== $phase: exit $rc, $(( $(date +%s) - start )) s wall"
  if used=$(extractor); then sha256sum "$used" > "$WORK/results/$tag-extractor.sha256"; fi
  pack
done
kill "$packer" 2>/dev/null
wait "$packer" 2>/dev/null
pack
ls -la "$OUT"
sleep 1   # let tee write the last lines into the log
