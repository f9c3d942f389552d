"""Each algorithm with channel blocks on a few conv layers, in NCHW and in blocks of this CPU's
vector width: the per-layer effect the tuner's layouts phase weighs against the transforms.

One layer at a time, default knobs, a synthetic activation at the density given (whole
channels and single values zero), the median of ``--runs`` measurements of 30 repeats each;
encode time in parentheses. Run it alone: anything else on the cores makes the timings
worthless.

    python examples/layout_pairs.py                 # the default layers, on this CPU
    python examples/layout_pairs.py --runs 5
"""
import argparse

import numpy as np

from tvm_sparseconv.conv import Conv2DSpec
from tvm_sparseconv.cpu import cpu_of
from tvm_sparseconv.layer import measure_algorithm, synthesize_activation, synthesize_weight
from tvm_sparseconv.layout import NCHW, lanes_layout
from tvm_sparseconv.reference import dense_conv2d

# (input N x C x H x W, weight M x C x Kh x Kw, padding, input density)
LAYERS = [((1, 192, 56, 56), (128, 192, 1, 1), 0, 0.59), ((1, 256, 28, 28), (128, 256, 1, 1), 0, 0.4),
          ((1, 512, 14, 14), (256, 512, 1, 1), 0, 0.3), ((1, 256, 14, 14), (1024, 256, 1, 1), 0, 0.45),
          ((1, 128, 28, 28), (128, 128, 3, 3), 1, 0.5)]
ALGORITHMS = ("dense", "hybrid", "pixcsr")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cpu = cpu_of(None)
    blocks = lanes_layout(cpu)
    print(f"cpu {cpu}")
    for xs, ws, pad, d in LAYERS:
        spec = Conv2DSpec.from_shapes(xs, ws, padding=pad)
        x, w = synthesize_activation(xs, d), synthesize_weight(spec)
        ref = dense_conv2d(spec, x, w)
        cells = []
        for algorithm in ALGORITHMS:
            for layout in (NCHW, blocks):
                recs = [measure_algorithm(algorithm, spec, x, w, ref, spec.macs, None,
                                          {"layout_in": layout, "layout_out": layout}, repeat=30)
                        for _ in range(args.runs)]
                if any(r.error for r in recs):
                    cells.append(f"{algorithm} {layout} failed: {recs[0].error or recs[-1].error}")
                    continue
                enc = f" ({np.median([r.encode_ms for r in recs]):.3f})" if recs[0].encode_ms else ""
                cells.append(f"{algorithm} {layout} {np.median([r.time_ms for r in recs]):.3f}{enc}")
        print(f"{xs} -> {ws[0]} {ws[2]}x{ws[3]}, density {d}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
