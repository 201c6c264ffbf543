#!/usr/bin/env bash
# Super-resolution and inpainting end to end, beside their trivial baselines (bicubic upsampling; the hole filled by
# blurring):
#   ae          stage 1: KL-f2, so the low-resolution image (factor 2) is exactly the latent's size
#   sr          stage 2, conditioning=super_resolution (factor 2, bicubic downsampling)
#   inpainting  stage 2, conditioning=inpainting (rectangles and strokes, half each), the same UNet and budget
#   extractor   a ResNet-9 classifier of the data (experiments/feature_extractors/train_classifier.py) whose pooled
#               features the Frechet distances use
#   evaluate    stage=evaluate of both on EVAL_N fixed validation pairs: PSNR, SSIM, consistency, FD with a ladder
# DATASET=digits (default; the CPU: embedded MNIST at 28x28, SR 14 -> 28, budgets in batches so the numbers do
# not depend on what else the machine runs) or DATASET=cifar10 (the GPU: the zip at .data/cifar10-train.zip,
# SR 16 -> 32, budgets in seconds of training).
# Usage (repo root): bash experiments/image_tasks/run.sh [phases...]; on the GPU machine carry .whl and .data.
# Environment: PYTHON (python3), WORK (outputs/image_tasks_<dataset>), OUT (log and results; WORK), EVAL_N (500),
# digits: AE_STEPS (1500), LDM_STEPS (3000); cifar10: AE_SECONDS (120), LDM_SECONDS (150); SMOKE=1: tiny budgets.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3} DATASET=${DATASET:-digits} SMOKE=${SMOKE:-0} EVAL_N=${EVAL_N:-500}
WORK=$(realpath -m "${WORK:-outputs/image_tasks_$DATASET}")
OUT=${OUT:-$WORK}
mkdir -p "$WORK" "$OUT"
if [ -d .whl ]; then   # the GPU machine: wheels it lacks (../shared/device/wheels.sh)
  [ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v "^WARNING: Target"
  export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
EXPORT=$WORK/autoencoder/ae/export/autoencoder.safetensors
EXTRACTOR=$WORK/extractor/$DATASET-resnet9.pt
common=("paths.output_root=$WORK" logger=csv callbacks.progress=null +trainer.enable_progress_bar=false)
case "$DATASET" in
  digits)
    data=(data=digits data.image_size=28)
    ae=(stage=autoencoder autoencoder=kl-f2-small trainer=cpu "max_steps=${AE_STEPS:-1500}" trainer.val_check_interval=500)
    ldm=(stage=diffusion unet=tiny trainer=cpu data.batch_size=64 "max_steps=${LDM_STEPS:-3000}"
         trainer.val_check_interval=1000 trainer.limit_val_batches=2)
    extractor=(--data digits --image-size 28 --width 32 --epochs 10 --device cpu)
    device=(evaluate.accelerator=cpu) ;;
  cifar10)
    ZIP=${CIFAR10_ZIP:-.data/cifar10-train.zip}
    data=(data=folder "data.root=$ZIP" data.image_size=32 data.channels=3 data.num_workers=8)
    ae=(experiment=cifar10-autoencoder-kl-f2 "data.root=$ZIP" max_steps=100000000 "max_train_seconds=${AE_SECONDS:-120}"
        module.compile=false)
    # cifar10-ldm's UNet, batch and lr, eager (compiling does not pay back in a few minutes).
    ldm=(experiment=cifar10-ldm "data.root=$ZIP" max_steps=100000000 "max_train_seconds=${LDM_SECONDS:-150}"
         data.batch_size=512 module.lr=6e-4 module.compile=false trainer.val_check_interval=1000000
         trainer.limit_val_batches=1)
    extractor=(--data cifar10 --root "$ZIP" --epochs 35)
    device=() ;;
  *) echo "DATASET must be digits or cifar10"; exit 2 ;;
esac
if [ "$SMOKE" = 1 ]; then
  if ! command -v nvidia-smi > /dev/null; then  # a check of the GPU commands on a CPU
    ae+=(trainer=cpu) ldm+=(trainer=cpu data.batch_size=16) device=(evaluate.accelerator=cpu) extractor+=(--device cpu)
  fi
  ae+=(max_steps=4 max_train_seconds=null) ldm+=(max_steps=6 max_train_seconds=null trainer.val_check_interval=3
       module.scale_estimation_batches=2 module.sampling.steps=2) extractor+=(--dry-run)
  EVAL_N=16
fi
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(ae sr inpainting extractor evaluate)
exec > >(tee -a "$OUT/image_tasks_$DATASET.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
$PYTHON -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
echo "git $(git rev-parse --short HEAD 2>/dev/null); DATASET=$DATASET phases ${phases[*]}; EVAL_N=$EVAL_N"
t0=$(date +%s)
for phase in "${phases[@]}"; do
  start=$(date +%s)
  echo "=== $phase ($(( start - t0 )) s since the start)"
  case "$phase" in
    ae)
      rm -rf "$WORK/autoencoder/ae"
      $PYTHON -m lightning_ldm "${ae[@]}" "${data[@]}" "${common[@]}" run_name=ae ;;
    sr|inpainting)
      rm -rf "$WORK/diffusion/$phase"
      task=$([ "$phase" = sr ] && echo "conditioning=super_resolution module.conditioning.low_res.factor=2" \
                               || echo "conditioning=inpainting")
      $PYTHON -m lightning_ldm "${ldm[@]}" "${data[@]}" "${common[@]}" $task "autoencoder.path=$EXPORT" \
        module.cache_latents=null module.num_log_images=8 run_name=$phase ;;
    extractor)
      $PYTHON experiments/feature_extractors/train_classifier.py "${extractor[@]}" --name "$DATASET-resnet9" \
        --out "$WORK/extractor" ;;
    evaluate)
      for task in sr inpainting; do
        $PYTHON -m lightning_ldm stage=evaluate "evaluate.ckpt=$WORK/diffusion/$task/checkpoints/last.ckpt" \
          "${data[@]}" "${device[@]}" "paths.output_root=$WORK" run_name=eval-$task "evaluate.num_samples=$EVAL_N" \
          evaluate.batch_size=100 evaluate.feature_extractor.kind=checkpoint "evaluate.feature_extractor.name=$DATASET-resnet9" \
          "evaluate.feature_extractor.path=$EXTRACTOR" "evaluate.report=$OUT/eval-$task.json" || break
        cp "$WORK/evaluate/eval-$task/grid.png" "$OUT/eval-$task-grid.png"
      done
      for task in sr inpainting; do  # the last validation grid of training (input | output | target)
        last=$(ls "$WORK/diffusion/$task/images/"val_samples_*.png 2>/dev/null | tail -1)
        [ -n "$last" ] && cp "$last" "$OUT/train-$task-val-grid.png"
      done
      cp "$WORK/extractor/result.json" "$OUT/extractor-result.json" 2>/dev/null ;;
    *) echo "unknown phase $phase (ae sr inpainting extractor evaluate)"; false ;;
  esac
  echo "=== $phase: exit $?, $(( $(date +%s) - start )) s wall"
done
echo "=== all: $(( $(date +%s) - t0 )) s wall"
