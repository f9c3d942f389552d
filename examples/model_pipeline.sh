#!/usr/bin/env bash
# A real CNN end to end: profile -> plan -> compile -> export -> run -> bench.
# usage: examples/model_pipeline.sh MODEL [IMAGE...]   (MODEL: resnet50-nsfw, vgg16-tumor, mobilenet-v2 or an .onnx file)
# The plan is the one shipped in tvm_sparseconv/shipped/ for this CPU; on another CPU it is tuned here first
# (a 15-minute budget; raise --budget-minutes / --trials for a better plan).
set -euo pipefail
model=${1:?usage: $0 MODEL [IMAGE...]}
shift
images=("${@:-skimage:astronaut}")
[ $# -gt 0 ] || images=(skimage:astronaut sklearn:china skimage:coffee)
out=build/$(basename "${model%.onnx}")
mkdir -p "$out"

echo "== profile: input density of every conv layer"
tvm-sparseconv profile "$model" --images "${images[@]}"

echo "== compile and export"
if ! tvm-sparseconv compile "$model" -o "$out/model.so" 2>"$out/compile.err"; then
  cat "$out/compile.err" >&2
  echo "== no shipped plan for this CPU: tuning one (15 minutes)"
  tvm-sparseconv tune "$model" --images "${images[@]}" --budget-minutes 15 --out "$out/tuning"
  run=$(ls -d "$out"/tuning/*/ | tail -n 1)
  db=(); [ -d "$run/database" ] && db=(--database "$run/database")
  tvm-sparseconv compile "$model" --plan "$run/plan.json" "${db[@]}" -o "$out/model.so"
fi

echo "== run the exported library"
tvm-sparseconv run "$out/model.so" --images "${images[@]}"

echo "== bench: plan vs all-dense TVM vs onnxruntime vs PyTorch, and where the plan's time goes"
tvm-sparseconv bench "$model" --images "${images[0]}" --rounds 3 --repeat 5 --ops  # rounds: the machine drifts
