"""The ``tvm-sparseconv`` command."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .build import CACHE_MODES
from .cpu import CPU, cpu_of


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


def _cpu_line(cpu: dict) -> str:
    """The CPU a table ran on, for its header (a cpu.CPU as a dict)."""
    return str(CPU.from_dict(cpu))


def print_layer_table(report: dict) -> None:
    spec = report["layer"]
    print(f"layer N={spec['batch']} C={spec['in_channels']} H={spec['height']} W={spec['width']} "
          f"M={spec['out_channels']} k={spec['kernel_h']}x{spec['kernel_w']} stride={tuple(spec['stride'])} "
          f"pad={tuple(spec['padding'])} dil={tuple(spec['dilation'])} | density {report['density']:.3f} | "
          f"threads {report['threads']} | MetaSchedule trials {report['trials']}")
    if report.get("cpu"):
        print(f"cpu {_cpu_line(report['cpu'])}")
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
        knobs = f", knobs {best['knobs']}" if best.get("knobs") else ""
        print(f"fastest: {best['algorithm']} ({best['time_ms']:.3f} ms{knobs})")


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
                       args.repeat, log=_log if not args.quiet else (lambda s: None), database=args.database,
                       knob_trials=args.knob_trials, progress=not args.quiet)
    report["target"] = args.target_str
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_layer_table(report)
    return 0


# -- models ------------------------------------------------------------------------------

def _model_args(p, inputs: bool = True) -> None:
    p.add_argument("model", help="an .onnx file or a known model: " + ", ".join(_known()))
    p.add_argument("--input-shape", default=None, help="fix the model input shape, e.g. 1,224,224,3")
    if inputs:
        _input_args(p)
    p.add_argument("--target", default=None, help="JSON dict target (default: this CPU)")
    p.add_argument("--threads", type=int, default=0, help="TVM threads (default: all cores)")


def _input_args(p) -> None:
    g = p.add_argument_group("sample inputs and preprocessing")
    g.add_argument("--images", nargs="+", default=[], help="image files, or skimage:NAME / sklearn:NAME samples")
    g.add_argument("--inputs", nargs="+", default=[], help="preprocessed model inputs (.npy)")
    g.add_argument("--scale", type=float, default=None, help="pixel multiplier (default 1/255)")
    g.add_argument("--mean", default=None, help="per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", default=None, help="per-channel std divided by")
    g.add_argument("--bgr", action="store_true", default=None, help="feed channels as BGR")


def _known():
    from .models import KNOWN_MODELS

    return list(KNOWN_MODELS)


def _preprocess(args, base):
    import dataclasses

    from .images import Preprocess

    pre = base or Preprocess()
    over = {}
    if args.scale is not None:
        over["scale"] = args.scale
    for k in ("mean", "std"):
        if getattr(args, k) is not None:
            over[k] = tuple(float(v) for v in getattr(args, k).split(","))
    if args.bgr:
        over["bgr"] = True
    return dataclasses.replace(pre, **over)


def _load_model(args):
    from .frontend import load_model
    from .models import known_labels, known_preprocess, model_path

    shape = _ints(args.input_shape) if args.input_shape else None
    model = load_model(model_path(args.model), shape)
    return model, known_preprocess(args.model), known_labels(args.model)


def _samples(args, model, base_pre):
    from .images import SAMPLE_IMAGES, load_inputs

    images = args.images or ([] if args.inputs else list(SAMPLE_IMAGES[:2]))
    return load_inputs(model, images, args.inputs, _preprocess(args, base_pre))


def cmd_profile(args) -> int:
    from .profile import profile

    model, pre, _ = _load_model(args)
    samples = _samples(args, model, pre)
    _log(f"profiling {args.model} on {len(samples)} samples ...")
    layers, _, _ = profile(model, samples, args.target, args.algorithm)
    if args.json:
        print(json.dumps({"model": args.model, "input_shape": list(model.input_shape), "samples": len(samples),
                          "layers": [l.to_dict() for l in layers]}, indent=1))
        return 0
    print(f"{args.model}: {len(layers)} conv layers, {len(samples)} samples, input {model.input_shape} {model.layout}")
    hdr = ["layer", "input CxHxW", "M", "kernel", "stride", "padding", "MMACs", "density", "+-", "min", "max",
           "zero ch", "fused", "note"]
    rows = [hdr]
    for l in layers:
        s = l.spec
        rows.append([l.key, f"{s['in_channels']}x{s['height']}x{s['width']}", str(s["out_channels"]),
                     f"{s['kernel_h']}x{s['kernel_w']}", "x".join(map(str, s["stride"])),
                     ",".join(map(str, s["padding"])), f"{l.macs / 1e6:.1f}", f"{l.density_mean:.3f}",
                     f"{l.density_std:.3f}", f"{l.density_min:.3f}", f"{l.density_max:.3f}",
                     f"{l.zero_channel_share:.3f}", ("bias" if l.bias else "") + ("+relu" if l.relu else ""),
                     l.why_dense or ""])
    w = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    for r in rows:
        print("  ".join(c.ljust(w[i]) if i in (0, 13) else c.rjust(w[i]) for i, c in enumerate(r)).rstrip())
    macs = sum(l.macs for l in layers)
    eff = sum(l.macs * l.density_mean for l in layers)
    print(f"total {macs / 1e9:.2f} GMACs; at the measured densities {eff / 1e9:.2f} GMACs have a non-zero input "
          f"({100 * eff / macs:.0f}%)")
    return 0


def _plan_for(args, model):
    """--plan, --algorithm, or the plan (and database) shipped for this model and target."""
    from .compile import resolve_plan
    from .shipped import available, shipped_plan

    if not args.plan and not args.algorithm:
        found = shipped_plan(args.model, args.target)
        if found is None:
            raise ValueError(f"give --plan PLAN.json or --algorithm NAME (no shipped plan for {args.model} on "
                             f"this target; shipped: {', '.join(available()) or 'none'})")
        args.plan = found[0]
        args.database = args.database or found[1]
        _log(f"using the shipped plan {found[0]}" + (f" and database {found[1]}" if found[1] else ""))
    return resolve_plan(model, args.plan, args.algorithm, args.target)


def cmd_compile(args) -> int:
    from .compile import build
    from .runner import export
    from .target import make_target

    model, pre, labels = _load_model(args)
    plan = _plan_for(args, model)
    target = make_target(args.target)
    _log(f"compiling {args.model} for {target} ...")
    b = build(model, plan, target, args.database)
    export(b.module, args.output, model, _preprocess(args, pre), labels, b.applied, target)
    print(f"wrote {args.output} (+ {os.path.basename(args.output)}.json); layers: {b.counts()}")
    return 0


def cmd_run(args) -> int:
    from .images import load_inputs
    from .runner import load, top_k

    m = load(args.library)
    if not m.input_shape and args.images:
        raise ValueError(f"{args.library} has no sidecar .json: give preprocessed --inputs")
    pre = _preprocess(args, m.preprocess)
    names = list(args.images) + list(args.inputs)
    xs = load_inputs(m, args.images, args.inputs, pre) if m.input_shape else \
        [np.load(p) for p in args.inputs]
    for name, x in zip(names, xs):
        y = m(x)
        lat = m.latency_ms(x, repeat=args.repeat)
        print(f"{name}: median latency {lat:.2f} ms")
        if y.size <= 10000:
            for label, score in top_k(y, m.labels, 5):
                print(f"  {score:9.5f}  {label}")
        else:
            print(f"  output shape {y.shape}")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench_model

    model, pre, _ = _load_model(args)
    x = _samples(args, model, pre)[0]
    plan = _plan_for(args, model)
    res = bench_model(model, x, plan, None, args.database, args.target, args.threads,
                      args.baseline, args.repeat, not args.no_peers, log=_log, ops=args.ops, rounds=args.rounds)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    rounds = f"; {args.rounds} rounds in turn: median round, ratios per round" if args.rounds > 1 else ""
    print(f"{args.model}: input {model.input_shape}, {args.threads} threads, median of {args.repeat} runs{rounds}")
    print(f"cpu {_cpu_line(cpu_of(args.target).to_dict())}")
    spread = args.rounds > 1
    print(f"{'':32} {'median ms':>10} {'plan speed-up':>14}{'  (min-max)' if spread else ''} {'max err':>9}  layers")
    for r in res["rows"]:
        lo, hi = r["plan_speedup_range"]
        print(f"{r['name']:32} {r['ms']:10.2f} {r['plan_speedup']:13.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if spread else "")
              + f" {_fmt(r['max_abs_error'], 6):>9}  {r['layers']}")
    print(f"plan vs the best of the others: {res['speedup_vs_best']:.2f}x")
    if args.ops:
        print("inside the plan's build, mean ms per inference (each call timed by a VM instrument):")
        for kind, ms in res["ops"].items():
            print(f"  {kind:30} {ms:8.3f}")
        print(f"  {'sum':30} {sum(res['ops'].values()):8.3f}")
    return 0


def cmd_refine(args) -> int:
    from .tune.refine import refine_plan

    model, pre, _ = _load_model(args)
    x = _samples(args, model, pre)[0]
    plan = _plan_for(args, model)
    refined, report = refine_plan(model, plan, x, args.target, rounds=args.rounds, log=_log)
    refined.save(args.output)
    with open(args.output + ".refine.json", "w") as f:
        json.dump(report, f, indent=1)
    if not report["builds"]:
        print(f"{report['why']}: wrote the plan unchanged to {args.output}")
        return 0
    print(f"{args.model}: end to end, median of {args.rounds} interleaved rounds")
    for b in report["builds"]:
        print(f"  {b['name']:16} {b['ms']:8.2f} ms  conv calls in the model {sum(b['layer_ms'].values()):7.2f} ms"
              + ("  <- chosen" if b["name"] == report["chosen"] else ""))
    print(f"wrote {args.output} (+ .refine.json: per-layer in-model ms of every build)")
    return 0


def cmd_tune(args) -> int:
    import time as _time

    from .tune.tuner import TuneConfig, Tuner

    model, pre, _ = _load_model(args)
    samples = _samples(args, model, pre)
    if args.resume:
        run_dir = args.resume
        if not os.path.isfile(os.path.join(run_dir, "trials.jsonl")):
            raise FileNotFoundError(f"--resume {run_dir}: no trials.jsonl there")
    else:
        name = os.path.splitext(os.path.basename(args.model))[0]
        run_dir = os.path.join(args.out, f"{name}-{_time.strftime('%Y%m%d-%H%M%S')}")
    rpc = None
    if args.rpc_tracker:
        host, _, port = args.rpc_tracker.rpartition(":")
        if not host or not port.isdigit() or not args.rpc_key:
            raise ValueError("--rpc-tracker takes HOST:PORT and needs --rpc-key")
        rpc = (host, int(port), args.rpc_key)
    algorithms = tuple(a.strip() for a in args.algorithms.split(",")) if args.algorithms != "all" else None
    cfg = TuneConfig(trials=args.trials, knob_trials=args.knob_trials, budget_minutes=args.budget_minutes,
                     rpc=rpc, cache=args.cache, refine=not args.no_refine,
                     **({"algorithms": algorithms} if algorithms else {}))
    _log(f"tuning {args.model} into {run_dir}")
    tuner = Tuner(model, samples, run_dir, args.target, cfg, model_name=args.model, log=_log)
    try:
        plan = tuner.run()
    except KeyboardInterrupt:
        _log(f"interrupted: finished measurements are in {run_dir}; continue with --resume {run_dir}")
        return 130
    counts = {}
    for l in plan.layers:
        counts[l.algorithm] = counts.get(l.algorithm, 0) + 1
    print(f"plan: {os.path.join(run_dir, 'plan.json')} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    print(f"report: {os.path.join(run_dir, 'report.md')}")
    db = os.path.join(run_dir, "database")
    print(f"next: tvm-sparseconv compile {args.model} --plan {os.path.join(run_dir, 'plan.json')}"
          + (f" --database {db}" if os.path.isdir(db) else "") + " -o model.so")
    return 0


def cmd_report(args) -> int:
    from .tune.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
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
    lay.add_argument("--knob-trials", type=int, default=1, help="knob configs measured per hand-scheduled "
                     "kernel, the defaults first (as the tuner's search); the fastest is reported")
    lay.add_argument("--repeat", type=int, default=7, help="timed repeats (median reported)")
    lay.add_argument("--peers", action="store_true", help="also run onnxruntime and PyTorch")
    lay.add_argument("--json", action="store_true", help="print one JSON object")
    lay.add_argument("--quiet", "-q", action="store_true")
    lay.set_defaults(func=cmd_layer)

    pro = sub.add_parser("profile", help="measure each conv layer's input density on sample inputs")
    _model_args(pro)
    pro.add_argument("--algorithm", default="dense", help="how the convs run while profiling")
    pro.add_argument("--json", action="store_true")
    pro.set_defaults(func=cmd_profile)

    com = sub.add_parser("compile", help="rewrite the convs per plan, compile and export a library")
    _model_args(com)
    com.add_argument("--plan", default=None, help="plan JSON (from tune, or written by hand); default: the plan "
                     "shipped in tvm_sparseconv/shipped/ for this model and target")
    com.add_argument("--algorithm", default=None, help="one algorithm on every layer that supports it")
    com.add_argument("--database", default=None, help="MetaSchedule JSON database folder for the dense ops")
    com.add_argument("-o", "--output", required=True, help="the .so to write (plus a .json beside it)")
    com.set_defaults(func=cmd_compile)

    ben = sub.add_parser("bench", help="end-to-end latency: plan vs all-dense vs onnxruntime vs PyTorch")
    _model_args(ben)
    ben.add_argument("--plan", default=None)
    ben.add_argument("--algorithm", default=None)
    ben.add_argument("--database", default=None)
    ben.add_argument("--baseline", default="dense", help="the algorithm of the all-dense build (default dense), "
                     "or another plan's .json to compare with")
    ben.add_argument("--rounds", type=int, default=1, help="time every build and peer this many times in turn "
                     "(medians and per-round ratios: the machine's drift hits all alike)")
    ben.add_argument("--repeat", type=int, default=10)
    ben.add_argument("--no-peers", action="store_true")
    ben.add_argument("--ops", action="store_true", help="also where the plan's time goes: ms per kind of op")
    ben.add_argument("--json", action="store_true")
    ben.set_defaults(func=cmd_bench)

    ref = sub.add_parser("refine", help="choose each dense layer's thread split inside the compiled model "
                         "(layers timed alone cannot see where their input sits); write a plan")
    _model_args(ref)
    ref.add_argument("--plan", default=None, help="plan JSON (default: the shipped plan for this model)")
    ref.add_argument("--algorithm", default=None, help=argparse.SUPPRESS)
    ref.add_argument("--database", default=None, help=argparse.SUPPRESS)
    ref.add_argument("--rounds", type=int, default=7, help="interleaved end-to-end rounds (default %(default)s)")
    ref.add_argument("-o", "--output", required=True, help="the refined plan's .json")
    ref.set_defaults(func=cmd_refine)

    tun = sub.add_parser("tune", help="measure every algorithm per conv layer on real activations; write a plan")
    _model_args(tun)
    tun.add_argument("--trials", type=int, default=0, help="MetaSchedule trials in all for the dense TE ops "
                     "(direct, im2col, MEC); 0 leaves them out")
    tun.add_argument("--knob-trials", type=int, default=6, help="configs measured per layer and sparse kernel")
    tun.add_argument("--budget-minutes", type=float, default=None, help="stop measuring new candidates after this")
    tun.add_argument("--cache", choices=CACHE_MODES, default="fresh",
                     help="what the caches hold when a candidate runs: fresh (default: its input just "
                     "rewritten by a copy split over the threads, as the op before leaves it in a model; "
                     "weights warm), warm (everything warm, the layer alone) or cold (all but the first "
                     "argument flushed); over RPC fresh falls back to cold")
    tun.add_argument("--no-refine", action="store_true", help="skip the last phase, which compiles the model "
                     "with each thread split of the dense layers and keeps the fastest end to end (`refine`)")
    tun.add_argument("--algorithms", default="all")
    tun.add_argument("--out", default="tuning_logs", help="parent folder of the run folder (default %(default)s)")
    tun.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    tun.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure on RPC servers")
    tun.add_argument("--rpc-key", default=None)
    tun.set_defaults(func=cmd_tune)

    rep = sub.add_parser("report", help="regenerate a tuning run's report.md and plots")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    run = sub.add_parser("run", help="run an exported model on images: top-5 and median latency")
    run.add_argument("library", help="model.so written by compile")
    _input_args(run)
    run.add_argument("--threads", type=int, default=0)
    run.add_argument("--repeat", type=int, default=10)
    run.set_defaults(func=cmd_run)
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
        # ModelError, PlanError, ImageError and KnobError are ValueErrors too
        print(f"tvm-sparseconv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvm-sparseconv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
