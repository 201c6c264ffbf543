#!/usr/bin/env bash
# Candidate recipes for the CPU quickstart, tried side by side on one GPU machine. Each recipe is the quickstart's
# three commands with its own overrides and the same number of batches it would train on the CPU, run in float32
# without compilation (as on the CPU), so only the wall time differs; the wall time on 2 CPU cores is measured
# on the CPU afterwards. Every recipe's 500 samples, and its first 64 (the grid), are scored by the digits
# classifier (score.py), which is trained here first on the training split.
#
# Usage (repo root of the GPU machine, wheels in .whl; OUT is the folder that comes back):
#   bash experiments/quickstart/recipe_search.sh experiments/quickstart/recipes.tsv
# A recipes file holds one recipe a line: name <TAB> stage-1 overrides <TAB> stage-2 overrides ('#' comments).
# Recipes with the same stage-1 overrides share one autoencoder. PARALLEL (8) runs go at once.
# SMOKE=1 checks every command on the CPU in minutes (a tiny classifier, 64 samples; the numbers mean nothing):
#   SMOKE=1 PY=.venv/bin/python bash experiments/quickstart/recipe_search.sh my-tiny-recipes.tsv
set -uo pipefail
cd "$(dirname "$0")/../.."
RECIPES=$1
OUT=${OUT:-/tmp/out}
WORK=$(realpath -m "${WORK:-outputs/recipe_search}")
PARALLEL=${PARALLEL:-8}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/recipe_search.log") 2>&1
if [ "$SMOKE" = 1 ]; then
  trainer=cpu classifier=(--dry-run) num_samples=64
else
  trainer=gpu classifier=() num_samples=500
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  nvidia-smi --query-gpu=name --format=csv,noheader
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
# float32 as on the CPU: no autocast, no TF32, no compilation, no CUDA graphs
exact=(trainer=$trainer trainer.precision=32-true float32_matmul_precision=highest logger=csv "paths.output_root=$WORK")
t0=$(date +%s)
stamp() { echo "=== $* ($(( $(date +%s) - t0 )) s)"; }

stamp classifier
$PY experiments/feature_extractors/train_classifier.py --data digits --out "$WORK/extractor" "${classifier[@]}" 2>&1 | tail -3 &
pids=($!)  # waited for by pid: a bare `wait` would also wait for the log's tee, which never ends

declare -A ae_of
names=()
while IFS=$'\t' read -r name ae_overrides ldm_overrides; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  names+=("$name")
  ae_of[$name]="ae-$(echo "$ae_overrides" | md5sum | cut -c1-8)"
  echo "$ae_overrides" > "$WORK/${ae_of[$name]}.overrides"
  echo "$ldm_overrides" > "$WORK/$name.overrides"
done < "$RECIPES"

stamp "stage 1: $(ls "$WORK"/ae-*.overrides | wc -l) autoencoder(s)"
for file in "$WORK"/ae-*.overrides; do
  ae=$(basename "$file" .overrides)
  # shellcheck disable=SC2046
  $PY -m lightning_ldm stage=autoencoder run_name="$ae" "${exact[@]}" module.compile=false \
    $(cat "$file") > "$WORK/$ae.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for file in "$WORK"/ae-*.overrides; do
  ae=$(basename "$file" .overrides)
  echo "$ae: $(cat "$file") -> val/psnr $($PY -c "import csv, sys; rows = [r['val/psnr'] for r in csv.DictReader(open(sys.argv[1])) if r.get('val/psnr')]; print(rows[-1] if rows else '?')" "$WORK/autoencoder/$ae/csv/metrics.csv")"
done

stamp "stage 2 and samples: ${#names[@]} recipes, $PARALLEL at a time"
run_recipe() {
  local name=$1 ae=$2
  # shellcheck disable=SC2046
  $PY -m lightning_ldm stage=diffusion run_name="$name" "${exact[@]}" module.compile=false module.cuda_graphs=false \
    "autoencoder.path=$WORK/autoencoder/$ae/export/autoencoder.safetensors" $(cat "$WORK/$name.overrides") \
    > "$WORK/$name.log" 2>&1 &&
  $PY -m lightning_ldm stage=sample run_name="$name" "paths.output_root=$WORK" sample.precision=32-true \
    sample.compile=false "sample.ckpt=$WORK/diffusion/$name/checkpoints/last.ckpt" sample.num_samples=$num_samples \
    sample.batch_size=$num_samples >> "$WORK/$name.log" 2>&1
  echo "$name: exit $?"
}
pids=()
for name in "${names[@]}"; do
  while [ "$(jobs -rp | wc -l)" -gt "$PARALLEL" ]; do sleep 1; done  # (the tee is a job too)
  run_recipe "$name" "${ae_of[$name]}" &
  pids+=($!)
done
wait "${pids[@]}"

stamp score
samples=()
for name in "${names[@]}"; do
  dir=$WORK/sample/$name/images
  [ -d "$dir" ] || continue
  mkdir -p "$WORK/first64/$name"
  ls "$dir"/*.png | sort | head -64 | xargs -I{} cp {} "$WORK/first64/$name/"
  samples+=("$name=$dir" "$name@64=$WORK/first64/$name")
done
$PY experiments/quickstart/score.py --extractor "$WORK/extractor/digits-resnet9.pt" --samples "${samples[@]}" --out "$OUT/score.json"
cp "$WORK/extractor/digits-resnet9.pt" "$WORK/extractor/result.json" "$OUT/"
tar -C "$WORK" -czf "$OUT/runs.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude=latent_cache \
  --exclude=first64 --exclude=extractor .
stamp done
