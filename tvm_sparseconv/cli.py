"""The ``tvm-sparseconv`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _ints(s: str, n: int | None = None) -> tuple[int, ...]:
    v = tuple(int(a) for a in str(s).replace("x", ",").split(",") if a != "")
    if n is not None and len(v) == 1:
        v = v * n
    return v


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        return f"{v:.{nd}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def print_layer_table(report: dict) -> None:
    spec = report["layer"]
    print(f"layer N={spec['batch']} C={spec['in_channels']} H={spec['height']} W={spec['width']} "
          f"M={spec['out_channels']} k={spec['kernel_h']}x{spec['kernel_w']} stride={tuple(spec['stride'])} "
          f"pad={tuple(spec['padding'])} dil={tuple(spec['dilation'])} | density {report['density']:.3f} | "
          f"threads {report['threads']} | MetaSchedule trials {report['trials']}")
    cols = [("algorithm", "algorithm", 0), ("max_abs_error", "max err", 6), ("time_ms", "total ms", 3),
            ("encode_ms", "encode ms", 3), ("multiply_ms", "mult ms", 3), ("effective_gflops", "eff GF/s", 1),
            ("dense_gflops", "dense GF/s", 1), ("stored_elements", "stored el", 0), ("stored_bytes", "bytes", 0),
            ("cr_vs_im2col", "CR/im2col", 2), ("cr_vs_mec", "CR/MEC", 2)]
    rows = [[h for _, h, _ in cols]]
    for r in report["results"]:
        if r.get("error"):
            rows.append([r["algorithm"], f"unsupported: {r['error']}"] + [""] * (len(cols) - 2))
            continue
        rows.append([_fmt(r[k], nd) if k != "algorithm" else r[k] for k, _, nd in cols])
    widths = [max(len(row[i]) for row in rows if len(row) > i and not row[1].startswith("unsupported"))
              for i in range(len(cols))]
    for row in rows:
        if row[1].startswith("unsupported"):
            print(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            print("  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(row, widths))))
    ok = [r for r in report["results"] if r.get("time_ms")]
    if ok:
        best = min(ok, key=lambda r: r["time_ms"])
        print(f"fastest: {best['algorithm']} ({best['time_ms']:.3f} ms)")


def cmd_layer(args) -> int:
    from .algorithms import ALGORITHMS
    from .conv import Conv2DSpec
    from .layer import run_layer, synthesize_activation, synthesize_weight
    from .peers import available_peers

    if args.input:
        for p in (args.input, args.weight):
            if p is None or not os.path.isfile(p):
                raise FileNotFoundError(f"--input needs --weight, and both must exist: {p}")
        x, w = np.load(args.input), np.load(args.weight)
        if x.ndim == 3:
            x = x[None]
        spec = Conv2DSpec.from_shapes(x.shape, w.shape, args.stride, args.padding, args.dilation, args.groups)
    else:
        n, c, h, wd = _ints(args.shape)
        kh, kw = _ints(args.kernel, 2)
        spec = Conv2DSpec.from_shapes((n, c, h, wd), (args.out_channels, c // args.groups, kh, kw),
                                      args.stride, args.padding, args.dilation, args.groups)
        x = synthesize_activation(spec.x_shape, args.density, args.seed)
        w = synthesize_weight(spec, args.seed + 1)
    if not np.all(np.isfinite(w)):
        raise ValueError("the weight holds NaN or Inf")
    algorithms = ALGORITHMS if args.algorithms == "all" else tuple(a.strip() for a in args.algorithms.split(","))
    for a in algorithms:
        if a not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}")
    peers = available_peers() if args.peers else []
    report = run_layer(spec, x, w, algorithms, args.target, args.threads, args.trials, args.work_dir, peers,
                       args.repeat, log=_log if not args.quiet else (lambda s: None), database=args.database)
    report["target"] = args.target_str
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_layer_table(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvm-sparseconv", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    lay = sub.add_parser("layer", help="run one conv layer through every algorithm (and the peers)")
    src = lay.add_argument_group("the layer: from files, or synthesised")
    src.add_argument("--input", help="activation .npy, N x C x H x W (or C x H x W)")
    src.add_argument("--weight", help="weight .npy, M x C x Kh x Kw")
    src.add_argument("--shape", default="1,64,56,56", help="N,C,H,W to synthesise (default %(default)s)")
    src.add_argument("--out-channels", "-m", type=int, default=64)
    src.add_argument("--kernel", "-k", default="3", help="Kh,Kw or one size (default %(default)s)")
    src.add_argument("--density", type=float, default=0.3, help="share of non-zeros (default %(default)s)")
    src.add_argument("--seed", type=int, default=0)
    lay.add_argument("--stride", default="1")
    lay.add_argument("--padding", default="1", help="p | ph,pw | top,left,bottom,right")
    lay.add_argument("--dilation", default="1")
    lay.add_argument("--groups", type=int, default=1)
    lay.add_argument("--algorithms", default="all", help="comma list or 'all'")
    lay.add_argument("--target", default=None, help='JSON dict, e.g. \'{"kind":"llvm","mcpu":"znver4","num-cores":2}\'')
    lay.add_argument("--threads", type=int, default=0, help="TVM / peer threads (default: all cores)")
    lay.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per dense algorithm (0 = untuned)")
    lay.add_argument("--work-dir", default=None, help="where --trials puts the MetaSchedule databases "
                     "(one folder per algorithm)")
    lay.add_argument("--database", default=None, help="a --work-dir of an earlier run: apply its tuned schedules")
    lay.add_argument("--repeat", type=int, default=7, help="timed repeats (median reported)")
    lay.add_argument("--peers", action="store_true", help="also run onnxruntime and PyTorch")
    lay.add_argument("--json", action="store_true", help="print one JSON object")
    lay.add_argument("--quiet", "-q", action="store_true")
    lay.set_defaults(func=cmd_layer)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .conv import ConvSpecError, UnsupportedConvError
    from .target import default_target, set_num_threads

    try:
        args.threads = set_num_threads(getattr(args, "threads", 0))
        if hasattr(args, "target"):
            args.target_str = args.target or json.dumps(default_target())
            args.target = json.loads(args.target) if args.target and args.target.strip().startswith("{") \
                else (args.target or default_target())
        for k in ("stride", "dilation"):
            if hasattr(args, k):
                setattr(args, k, _ints(getattr(args, k), 2))
        if hasattr(args, "padding"):
            args.padding = _ints(args.padding)
        return args.func(args)
    except (ConvSpecError, UnsupportedConvError, FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        print(f"tvm-sparseconv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvm-sparseconv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
