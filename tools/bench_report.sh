#!/usr/bin/env bash
# Rebuilds the committed bench report, benchmarks/results/bench/report.html: the default bench run named in the
# README's "Latest bench", with the token break-even plot and the quality tables of the trained methods (distilled
# students, compressed models and the compressed twins' speed) that the bench alone cannot show — each benchmark
# script writes its JSON, and this puts them beside the bench's own rows in one file.
#   bash tools/bench_report.sh [RUN]
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-20261205-231326-36f70e}"
results=benchmarks/results
tables=()
for json in "$results"/distill_quality*.json "$results"/compress_quality*.json "$results"/compress_twins*.json; do
  tables+=(--table "$json")
done
HF_HUB_OFFLINE=1 effdiff report --out "$results/bench" --run "$run" --html "$results/bench/report.html" \
  --figure "$results/tokens/breakeven.png" "${tables[@]}" > /dev/null
echo "wrote $results/bench/report.html (run $run, ${#tables[@]} table flags)"
