#!/usr/bin/env bash
# The per-layer benchmarks of the README, side by side with onnxruntime and PyTorch (same threads).
#   examples/bench_layers.sh vgg    VGG-16-sized 3x3 layers at densities 0.2/0.4/0.7, every algorithm,
#                                   direct (TVM's conv2d) tuned with MetaSchedule (64 trials, the GEMMs
#                                   of im2col and MEC 16 trials), then the same databases reused
#   examples/bench_layers.sh peers  the layers of issue 5 at 0.1/0.3/0.5/0.8: the fast kernels vs the peers
# Further arguments go to every `tvm-sparseconv layer` call, e.g. `peers --knob-trials 8` (each
# kernel on 8 knob configs, the fastest reported; ~8x the time).
# JSON goes to build/bench/ (or $OUT), markdown tables to stdout (tvm-sparseconv results).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/bench}
mkdir -p "$out"
which=${1:-vgg}
shift $(( $# > 0 ? 1 : 0 ))
extra=("$@")

layer() {  # name shape m kernel stride padding density algorithms [extra...]
  local name=$1 shape=$2 m=$3 k=$4 s=$5 p=$6 d=$7 algos=$8
  shift 8
  tvm-sparseconv layer --shape "$shape" -m "$m" -k "$k" --stride "$s" --padding "$p" --density "$d" \
    --algorithms "$algos" --peers --json -q "$@" "${extra[@]}" > "$out/$name-d$d.json"
}

if [ "$which" = vgg ]; then
  for spec in "v56 1,256,56,56 256" "v28 1,512,28,28 512" "v14 1,512,14,14 512"; do
    set -- $spec
    db=$out/ms-$1
    if [ ! -d "$db/direct" ]; then  # tune once per layer shape; density does not change a dense kernel
      tvm-sparseconv layer --shape "$2" -m "$3" --algorithms direct --trials 64 --work-dir "$db" -q --json >/dev/null
      tvm-sparseconv layer --shape "$2" -m "$3" --algorithms im2col,mec --trials 16 --work-dir "$db" -q --json >/dev/null
    fi
    for d in 0.2 0.4 0.7; do
      layer "$1" "$2" "$3" 3 1 1 "$d" all --database "$db"
    done
  done
  tvm-sparseconv results "$out"/v56-*.json "$out"/v28-*.json "$out"/v14-*.json
else
  for spec in "p56 1,256,56,56 256 3 1 1" "p28 1,512,28,28 512 3 1 1" "p14 1,512,14,14 512 3 1 1" \
              "p112 1,128,112,112 128 3 1 1" "pw14 1,256,14,14 1024 1 1 0" "s2 1,256,56,56 256 3 2 1"; do
    set -- $spec
    for d in 0.1 0.3 0.5 0.8; do
      layer "$1" "$2" "$3" "$4" "$5" "$6" "$d" dense,halo,pixcsr,hybrid,cpo,im2csr
    done
  done
  tvm-sparseconv results "$out"/p56-*.json "$out"/p28-*.json "$out"/p14-*.json \
    "$out"/p112-*.json "$out"/pw14-*.json "$out"/s2-*.json
fi
