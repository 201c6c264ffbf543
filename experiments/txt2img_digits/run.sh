#!/usr/bin/env bash
# Text-to-image end to end on captioned digit scenes, one device, then prompt accuracy of the samples:
#   ae      stage 1, experiment=txt2img-digits-autoencoder (KL f4 at 64x64; -cpu-autoencoder: f2 at 32x32) for
#           AE_SECONDS of training time
#   ldm     stage 2, experiment=txt2img-digits (-cpu on the CPU: UNet with cross-attention + a text transformer
#           trained with it, its tokenizer learned from the captions) on that export for TRAIN_SECONDS
#   sample  COUNT seen and COUNT held-out prompts (evaluation_prompts of the data), REPEATS seeds each, CFG GUIDANCE
#   score   experiments/txt2img_digits/score.py: prompt accuracy per seed block, shuffled prompts, real scenes, FD
# Usage (repo root; the caller sets OUT; on the GPU machine carry .whl with tokenizers in it):
#   bash experiments/txt2img_digits/run.sh                  # every phase (about 11 minutes on an H100:
#   bash experiments/txt2img_digits/run.sh ae ldm           #   two device calls, the second at once on the warm
#   SKIP_INSTALL=1 bash experiments/txt2img_digits/run.sh sample score     # machine, which keeps outputs/)
#   DEVICE=cpu AE_SECONDS=150 TRAIN_SECONDS=450 bash experiments/txt2img_digits/run.sh   # the CPU quickstart
# Environment: OUT (/tmp/out), WORK (outputs/txt2img_digits), DEVICE (gpu | cpu), SIZE (64; 32 on the CPU), AE_SECONDS (180),
# TRAIN_SECONDS (300), AE_EXPERIMENT, LDM_EXPERIMENT (the -cpu presets on the CPU), AE_ARGS, LDM_ARGS (extra overrides),
# MAX_DIGITS (2; 1 on the CPU), DIGIT_SCALE (1; 2 on the CPU), COUNT (200), REPEATS (3), GUIDANCE (3), SMOKE=1 (tiny sizes, a check of the commands).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
DEVICE=${DEVICE:-gpu} SMOKE=${SMOKE:-0}
SIZE=${SIZE:-$([ "$DEVICE" = cpu ] && echo 32 || echo 64)}
AE_SECONDS=${AE_SECONDS:-180} TRAIN_SECONDS=${TRAIN_SECONDS:-300}
COUNT=${COUNT:-200} REPEATS=${REPEATS:-3} GUIDANCE=${GUIDANCE:-3}
MAX_DIGITS=${MAX_DIGITS:-$([ "$DEVICE" = cpu ] && echo 1 || echo 2)}   # the presets' data.max_digits
DIGIT_SCALE=${DIGIT_SCALE:-$([ "$DEVICE" = cpu ] && echo 2 || echo 1)}  # and data.digit_scale
suffix=$([ "$DEVICE" = cpu ] && echo -cpu)
AE_EXPERIMENT=${AE_EXPERIMENT:-txt2img-digits$suffix-autoencoder} LDM_EXPERIMENT=${LDM_EXPERIMENT:-txt2img-digits$suffix}
WORK=$(realpath -m "${WORK:-outputs/txt2img_digits}")
EXPORT=$WORK/autoencoder/ae/export/autoencoder.safetensors
CKPT=$WORK/diffusion/ldm/checkpoints/last.ckpt
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(ae ldm sample score)
exec > >(tee -a "$OUT/txt2img_digits.log") 2>&1
t0=$(date +%s)
if [ -d .whl ]; then   # the GPU machine: wheels it lacks (hydra, tokenizers, torchdata: ../shared/device/wheels.sh)
  [ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v "^WARNING: Target"
  export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -c "import torch, lightning, tokenizers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'tokenizers', tokenizers.__version__)"
echo "git $(git rev-parse --short HEAD 2>/dev/null); phases ${phases[*]}; SIZE=$SIZE DEVICE=$DEVICE AE_SECONDS=$AE_SECONDS" \
     "TRAIN_SECONDS=$TRAIN_SECONDS MAX_DIGITS=$MAX_DIGITS DIGIT_SCALE=$DIGIT_SCALE COUNT=$COUNT REPEATS=$REPEATS GUIDANCE=$GUIDANCE"

# Eager: compiling took 144 s of a 220 s training-time budget on an H100, more than it gave back in minutes.
common=(data.image_size=$SIZE data.max_digits=$MAX_DIGITS data.digit_scale=$DIGIT_SCALE logger=csv "paths.output_root=$WORK" callbacks.progress=null
        +trainer.enable_progress_bar=false module.compile=false)
[ "$DEVICE" = cpu ] && common+=(trainer=cpu)
extra_ae=() extra_ldm=() extra_sample=()
if [ "$SMOKE" = 1 ]; then
  extra_ae=(data.num_scenes=256 data.batch_size=8 loss.disc_start=5 trainer.val_check_interval=5 trainer.limit_val_batches=1)
  extra_ldm=(data.num_scenes=256 data.batch_size=8 module.cache_latents=false trainer.val_check_interval=20
             trainer.limit_val_batches=1 module.scale_estimation_batches=2 module.sampling.steps=2 module.num_log_images=4)
  extra_sample=(sample.steps=2)
fi
[ "$DEVICE" = cpu ] && extra_sample+=(sample.accelerator=cpu)

pack() {   # small results -> $OUT/txt2img_digits.tgz (never checkpoints, exports or caches)
  tar -C "$WORK" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' --exclude='latent_cache' \
    -czf "$OUT/txt2img_digits.tgz.tmp" . 2>/dev/null &&
    mv -f "$OUT/txt2img_digits.tgz.tmp" "$OUT/txt2img_digits.tgz"
}
for phase in "${phases[@]}"; do
  start=$(date +%s)
  echo "=== $phase ($(( start - t0 )) s since the start)"
  case "$phase" in
    ae)
      rm -rf "$WORK/autoencoder/ae"
      python3 -m lightning_ldm "experiment=$AE_EXPERIMENT" "${common[@]}" run_name=ae max_steps=100000000 \
        "max_train_seconds=$AE_SECONDS" "${extra_ae[@]}" ${AE_ARGS:-} ;;
    ldm)
      rm -rf "$WORK/diffusion/ldm"
      python3 -m lightning_ldm "experiment=$LDM_EXPERIMENT" "${common[@]}" run_name=ldm "autoencoder.path=$EXPORT" \
        max_steps=100000000 "max_train_seconds=$TRAIN_SECONDS" "${extra_ldm[@]}" ${LDM_ARGS:-} ;;
    sample)
      python3 experiments/txt2img_digits/score.py --write-prompts "$WORK/prompts" --count "$COUNT" --reader unused \
        --max-digits "$MAX_DIGITS" &&
      for kind in seen held_out; do
        rm -rf "$WORK/sample/$kind"
        python3 -m lightning_ldm stage=sample "sample.ckpt=$CKPT" "paths.output_root=$WORK" run_name=$kind \
          "sample.prompt_file=$WORK/prompts/$kind.txt" "sample.num_samples=$(( COUNT * REPEATS ))" \
          sample.batch_size=200 sample.grid_size=64 "sample.guidance_scale=$GUIDANCE" "${extra_sample[@]}" || break
      done ;;
    score)
      python3 experiments/txt2img_digits/score.py --repeats "$REPEATS" --reader "$WORK/digit_reader.safetensors" \
        --samples "seen=$WORK/sample/seen/images" "held_out=$WORK/sample/held_out/images" \
        --max-digits "$MAX_DIGITS" --digit-scale "$DIGIT_SCALE" --out "$WORK/scores.json" ;;
    *) echo "unknown phase $phase (ae ldm sample score)"; false ;;
  esac
  echo "=== $phase: exit $?, $(( $(date +%s) - start )) s wall"
  pack
done
echo "=== all: $(( $(date +%s) - t0 )) s wall"
