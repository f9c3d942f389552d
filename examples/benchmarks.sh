#!/usr/bin/env bash
# Measure on this CPU and regenerate docs/benchmarks.md: the shipped models end to end at batch 1
# and 8 (bench, 5 and 3 rounds in turn; each with its shipped plan for this CPU, else the plan the cost model predicts)
# and the per-layer set against the peers (examples/bench_layers.sh peers).
# The JSON goes to docs/results/<target key>/; docs/benchmarks.md is made from every CPU's.
# Run it alone: anything else on the cores makes the timings worthless. About 35 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(python -c "from tvm_sparseconv.target import target_key; print(target_key(None))")
out=docs/results/$key
mkdir -p "$out/layers"
for model in vgg16-tumor resnet50-nsfw mobilenet-v2; do
  tvm-sparseconv bench "$model" --images skimage:astronaut sklearn:china --rounds 5 --repeat 5 --batch 1 --ops --json \
    > "$out/bench-$model.json"
  tvm-sparseconv bench "$model" --images skimage:astronaut sklearn:china --rounds 3 --repeat 5 --batch 8 --ops --json \
    > "$out/bench-$model-b8.json"
done
OUT=$out/layers bash examples/bench_layers.sh peers > /dev/null
tvm-sparseconv results docs/results/*/bench-*.json docs/results/*/layers/*.json -o docs/benchmarks.md
