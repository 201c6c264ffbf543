#!/usr/bin/env bash
# Super-resolution (14 -> 28) and inpainting on the embedded digits at 28x28, on the CPU, end to end:
#   ae          stage 1: KL-f2 (14x14 latents: the low-resolution image is the latent's size), AE_STEPS batches of 16
#   sr          stage 2, conditioning=super_resolution (factor 2, bicubic), tiny UNet, LDM_STEPS batches of 64
#   inpainting  stage 2, conditioning=inpainting (rectangles and strokes), the same UNet and budget
#   extractor   a small ResNet-9 digit classifier (experiments/feature_extractors/train_classifier.py), whose
#               pooled features the Frechet distances use
#   evaluate    stage=evaluate of both on the 500 fixed validation pairs, beside bicubic / blur-fill baselines
# Training budgets are counted in batches, not seconds, so the numbers do not depend on what else the machine runs.
# Usage (repo root): bash experiments/image_tasks_digits/run.sh [phases...]
# Environment: PYTHON (python3), WORK (outputs/image_tasks_digits), OUT (where the log and results go; WORK),
# AE_STEPS (1500), LDM_STEPS (3000), EVAL_N (500), SMOKE=1 (tiny budgets: a check of the commands).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WORK=$(realpath -m "${WORK:-outputs/image_tasks_digits}")
OUT=${OUT:-$WORK}
mkdir -p "$WORK" "$OUT"
AE_STEPS=${AE_STEPS:-1500} LDM_STEPS=${LDM_STEPS:-3000} EVAL_N=${EVAL_N:-500} SMOKE=${SMOKE:-0}
EXPORT=$WORK/autoencoder/ae/export/autoencoder.safetensors
EXTRACTOR=$WORK/extractor/digits28-resnet9.pt
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(ae sr inpainting extractor evaluate)
exec > >(tee -a "$OUT/image_tasks_digits.log") 2>&1
common=(data=digits data.image_size=28 trainer=cpu logger=csv "paths.output_root=$WORK" callbacks.progress=null
        +trainer.enable_progress_bar=false)
ldm=(stage=diffusion "autoencoder.path=$EXPORT" unet=tiny data.batch_size=64 "max_steps=$LDM_STEPS"
     trainer.val_check_interval=1000 trainer.limit_val_batches=2 module.num_log_images=8)
extractor_args=()
if [ "$SMOKE" = 1 ]; then
  ldm+=(trainer.val_check_interval=5 module.scale_estimation_batches=2 module.sampling.steps=2)
  extractor_args=(--dry-run)
fi
echo "git $(git rev-parse --short HEAD 2>/dev/null); phases ${phases[*]}; AE_STEPS=$AE_STEPS LDM_STEPS=$LDM_STEPS EVAL_N=$EVAL_N"
$PYTHON -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
t0=$(date +%s)
for phase in "${phases[@]}"; do
  start=$(date +%s)
  echo "=== $phase ($(( start - t0 )) s since the start)"
  case "$phase" in
    ae)
      $PYTHON -m lightning_ldm stage=autoencoder autoencoder=kl-f2-small "${common[@]}" run_name=ae \
        "max_steps=$AE_STEPS" trainer.val_check_interval=500 ;;
    sr|inpainting)
      task=$([ "$phase" = sr ] && echo "conditioning=super_resolution module.conditioning.low_res.factor=2" \
                               || echo "conditioning=inpainting")
      $PYTHON -m lightning_ldm "${ldm[@]}" $task "${common[@]}" run_name=$phase ;;
    extractor)
      # The classifier sees the 28x28 digits the models make (its data module at image_size 28).
      $PYTHON experiments/feature_extractors/train_classifier.py --data digits --image-size 28 --width 32 \
        --epochs 10 --device cpu --name digits28-resnet9 --out "$WORK/extractor" "${extractor_args[@]}" ;;
    evaluate)
      for task in sr inpainting; do
        $PYTHON -m lightning_ldm stage=evaluate "evaluate.ckpt=$WORK/diffusion/$task/checkpoints/last.ckpt" \
          data=digits data.image_size=28 "paths.output_root=$WORK" run_name=eval-$task evaluate.accelerator=cpu \
          "evaluate.num_samples=$EVAL_N" evaluate.batch_size=100 evaluate.feature_extractor.kind=checkpoint \
          evaluate.feature_extractor.name=digits28-resnet9 "evaluate.feature_extractor.path=$EXTRACTOR" \
          "evaluate.report=$OUT/eval-$task.json" || break
        cp "$WORK/evaluate/eval-$task/grid.png" "$OUT/eval-$task-grid.png"
      done ;;
    *) echo "unknown phase $phase (ae sr inpainting extractor evaluate)"; false ;;
  esac
  echo "=== $phase: exit $?, $(( $(date +%s) - start )) s wall"
done
echo "=== all: $(( $(date +%s) - t0 )) s wall"
