#!/usr/bin/env bash
# The memory of the shipped models on this CPU, with their shipped plans: per conv layer, Relax's
# storage plan, the peak RSS of the exported library at batch 1 and 8 against onnxruntime, and what
# each algorithm's format stores on the sample photos' activations. The JSON goes to
# docs/results/<target key>/memory/; docs/memory.md is made from every CPU's. Memory numbers do not
# need an idle machine. About 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(python -c "from tvm_sparseconv.target import target_key; print(target_key(None))")
out=docs/results/$key/memory
mkdir -p "$out"
for model in vgg16-tumor resnet50-nsfw; do
  tvm-sparseconv memory "$model" --formats --json "$out/memory-$model.json" > /dev/null
done
tvm-sparseconv results docs/results/*/memory/*.json -o docs/memory.md
