#!/usr/bin/env bash
# Trains scene-judge, scene-sd and scene-dit side by side on one GPU, then scores both generators on the
# fixed digit-scene prompts (DDIM-50/5/10, DPM-Solver++ 10, UniPC 10; guidance 4; several seeds) with the
# judge, and packs what must come back into OUT_DIR (at most 8 files of at most 15 MiB each).
#
# Needs the scene bundle made on a machine with mlxtend and MiniLM (python -m effdiff.zoo.scene_data
# .gpu/scene_bundle.pt), diffusers importable, and src on PYTHONPATH. Every job writes its own log; a
# model whose training fails is left out of the evaluation and the others still come back.
#
# Usage: tools/train_scenes_gpu.sh OUT_DIR
# Environment (defaults = the GPU run; the CPU dry run in the zoo README, "Digit scenes", shrinks them):
#   SCENES_DEVICE=cuda SCENES_MINUTES=5 SCENES_BATCH=256 SCENES_BF16=1 JUDGE_MINUTES=2 (in parallel with the generators, so it costs no wall time) JUDGE_BATCH=512
#   SCENES_LR_SD=1e-3 SCENES_LR_DIT=6e-4 (the deeper, wider DiT gets a lower rate than tiny-dit's 1e-3)
#   SCENES_EVAL_SEEDS=3 SCENES_EVAL_PER_CATEGORY=48 SCENES_STEP_DIVISOR=1 SCENES_EVAL_HELDOUT=2000
#   SCENES_RUNS=runs/scenes
#   EFFDIFF_SCENES=.gpu/scene_bundle.pt
set -euo pipefail
out=${1:?usage: train_scenes_gpu.sh OUT_DIR}
device=${SCENES_DEVICE:-cuda}; minutes=${SCENES_MINUTES:-5}; batch=${SCENES_BATCH:-256}
judge_minutes=${JUDGE_MINUTES:-2}; judge_batch=${JUDGE_BATCH:-512}
seeds=${SCENES_EVAL_SEEDS:-3}; per_category=${SCENES_EVAL_PER_CATEGORY:-48}; divisor=${SCENES_STEP_DIVISOR:-1}
runs=${SCENES_RUNS:-runs/scenes}; logs="$runs/logs"
export EFFDIFF_JUDGE_HELDOUT=${SCENES_EVAL_HELDOUT:-2000}  # held-out scenes for the judge's accuracy
declare -A lr=([scene-sd]=${SCENES_LR_SD:-1e-3} [scene-dit]=${SCENES_LR_DIT:-6e-4})
export EFFDIFF_SCENES=${EFFDIFF_SCENES:-.gpu/scene_bundle.pt}
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-5}
[[ -f "$EFFDIFF_SCENES" ]] || { echo "missing scene bundle $EFFDIFF_SCENES" >&2; exit 2; }
mkdir -p "$out" "$logs"
bf16=(); if [[ ${SCENES_BF16:-1} == 1 ]]; then bf16=(--bf16); fi
start=$SECONDS
{ nvidia-smi || true; python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)"; } \
  > "$logs/env.log" 2>&1 || true

declare -A pid
python3 -m effdiff.zoo.train scene-judge --out "$runs/scene-judge" --device "$device" --steps 1000000 \
  --batch-size "$judge_batch" --max-minutes "$judge_minutes" --checkpoint-every 100000 \
  > "$logs/scene-judge.log" 2>&1 & pid[scene-judge]=$!
for m in scene-sd scene-dit; do
  python3 -m effdiff.zoo.train "$m" --out "$runs/$m" --device "$device" --steps 1000000 --batch-size "$batch" \
    --lr "${lr[$m]}" --max-minutes "$minutes" "${bf16[@]}" --checkpoint-every 1000 > "$logs/$m.log" 2>&1 & pid[$m]=$!
done
models=()
for m in scene-judge scene-sd scene-dit; do
  if wait "${pid[$m]}"; then
    echo "$m trained ($((SECONDS - start)) s)" | tee -a "$logs/status.log"
    [[ $m == scene-judge ]] || models+=(--model "$m=$runs/$m/export")
  else
    echo "$m FAILED (exit $?), see $m.log" | tee -a "$logs/status.log"
  fi
done

if [[ -f "$runs/scene-judge/export/model.safetensors" ]]; then
  mkdir -p "$logs/preview"
  python3 tools/scenes_gpu_eval.py "$out/scenes_results.json" --judge "$runs/scene-judge/export" "${models[@]}" \
    --device "$device" --seeds "$seeds" --per-category "$per_category" --step-divisor "$divisor" \
    --samples "$logs/samples_ddim50.pt" --preview "$logs/preview" > "$logs/eval.log" 2>&1 \
    || echo "evaluation FAILED (exit $?), see eval.log" | tee -a "$logs/status.log"
else
  echo "no judge: evaluation skipped" | tee -a "$logs/status.log"
fi
echo "total $((SECONDS - start)) s" | tee -a "$logs/status.log"

# Pack: the exports (fp16 generators) as one tar split into 15 MiB parts, and the logs with the samples.
exports=()
for m in scene-judge scene-sd scene-dit; do
  if [[ -f "$runs/$m/export/effdiff_model.json" ]]; then exports+=("$m/export"); fi
done
if ((${#exports[@]})); then
  tar cf - -C "$runs" "${exports[@]}" | split -b 15m -d - "$out/scene_models.tar.part"
fi
for m in scene-judge scene-sd scene-dit; do  # the training records, readable without unpacking
  if [[ -f "$runs/$m/export/effdiff_model.json" ]]; then cp "$runs/$m/export/effdiff_model.json" "$logs/$m.record.json"; fi
done
tar czf "$out/scene_logs.tgz" -C "$runs" logs
ls -la "$out"
