#!/usr/bin/env bash
# Trains tiny-sd and tiny-dit side by side on one GPU (the command the zoo README records), then
# generates their 1,000 evaluation samples. Needs EFFDIFF_CACHE with mnist_split.pt and
# caption_states.pt (made here by `effdiff zoo prepare`), and diffusers importable.
set -euo pipefail
out=${1:?usage: train_zoo_gpu.sh OUT_DIR [MINUTES]}; minutes=${2:-7}
export TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1
for m in tiny-sd tiny-dit; do
  python3 -m effdiff.zoo.train "$m" --out "runs/$m" --device cuda --steps 1000000 --batch-size 512 \
    --max-minutes "$minutes" --bf16 --checkpoint-every 2000 > "$out/$m.log" 2>&1 &
done
wait
for m in tiny-sd tiny-dit; do
  python3 tools/gpu_sample.py "runs/$m/export" "$m" "$out/$m-samples.pt" --device cuda
done
(cd runs && tar czf "$out/models.tgz" tiny-sd/export tiny-dit/export)
