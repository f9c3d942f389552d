#!/usr/bin/env bash
# A real CNN end to end: profile -> plan -> compile -> export -> run -> bench.
# usage: examples/model_pipeline.sh MODEL [IMAGE...]   (MODEL: resnet50-nsfw, vgg16-tumor, mobilenet-v2 or an .onnx file)
# The plan is the one shipped in tvm_sparseconv/shipped/ for this CPU; on another CPU, the one the cost model
# predicts from the images' densities (docs/cost-model.md). For a plan measured on this CPU, tune:
#   tvm-sparseconv tune MODEL --images ... && tvm-sparseconv compile MODEL --plan tuning_logs/<run>/plan.json -o ...
set -euo pipefail
model=${1:?usage: $0 MODEL [IMAGE...]}
shift
images=("${@:-skimage:astronaut}")
[ $# -gt 0 ] || images=(skimage:astronaut sklearn:china skimage:coffee)
out=build/$(basename "${model%.onnx}")
mkdir -p "$out"

echo "== profile: input density of every conv layer"
tvm-sparseconv profile "$model" --images "${images[@]}"

echo "== compile and export (the shipped plan, or a predicted one)"
tvm-sparseconv compile "$model" --images "${images[@]}" -o "$out/model.so"

echo "== run the exported library"
tvm-sparseconv run "$out/model.so" --images "${images[@]}"

echo "== bench: plan vs all-dense TVM vs onnxruntime vs PyTorch, and where the plan's time goes"
# the same images as compile: a predicted plan is the same one (the first image is timed)
tvm-sparseconv bench "$model" --images "${images[@]}" --rounds 3 --repeat 5 --ops  # rounds: the machine drifts
