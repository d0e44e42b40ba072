#!/usr/bin/env bash
# The whole `hyperowl eval` pipeline over the synthetic benchmark files, for one or more checkpoints
# (mPLUG-Owl3 or a transformers LLaVA baseline), then one report comparing them in OUT
# (report.md, summary.json, plots). Benchmark files and run folders go to runs/eval-synthetic/.
#
#   bash benchmarks/eval_synthetic.sh OUT LABEL=CHECKPOINT [LABEL=CHECKPOINT ...]
#   bash benchmarks/eval_synthetic.sh benchmarks/results/eval-synthetic \
#       hyperowl=hyperowl/assets/default-model llava-baseline=runs/baseline-llava
set -euo pipefail
out=$1
shift
work=runs/eval-synthetic
bench="$work/bench"
[ -f "$bench/mmbench_synthetic.tsv" ] || hyperowl eval make-synthetic --out "$bench"
runs=()
for spec in "$@"; do
  label=${spec%%=*}
  model=${spec#*=}
  common=(--model "$model" --label "$label" --device cpu --no-progress)
  hyperowl eval run mmbench --data "$bench/mmbench_synthetic.tsv" --out "$work/$label-mmbench" "${common[@]}"
  hyperowl eval run distractor --data "$bench/mmbench_synthetic.tsv" --out "$work/$label-distractor" \
    --levels 1,5,10,20,50,100,200 "${common[@]}"
  hyperowl eval run multi-image --data "$bench/multi_image/multi_image.json" --out "$work/$label-multi-image" "${common[@]}"
  hyperowl eval run longvideobench --data "$bench/longvideobench/lvb_val.json" --out "$work/$label-video" \
    --max-frames 16 "${common[@]}"
  for kind in mmbench distractor multi-image video; do
    runs+=("$work/$label-$kind")
  done
done
hyperowl eval report "${runs[@]}" --out "$out"
