"""One function per command: load the inputs, call the library, hand the result to tables.py.

``run`` readies what parser.py parsed (threads, target, stride/padding/dilation as ints) and
calls the command; main (``__init__.py``) turns the library's errors into exit code 2.
"""
from __future__ import annotations

import json
import os
import shlex
import sys

import numpy as np

from . import tables
from .parser import ints


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(args, result: dict, table) -> int:
    """Print ``result`` as JSON with --json, else with its table printer."""
    if args.json:
        tables.print_json(result)
    else:
        table(result)
    return 0


def _command_line(args) -> str:
    """The command as typed, for the results it produced (``bench --json``, ``layer --json``)."""
    return shlex.join(["tvm-sparseconv", *args.argv])


# -- inputs -----------------------------------------------------------------------------------

def _preprocess(args, base):
    import dataclasses

    from ..images import Preprocess

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
    from ..frontend import load_model
    from ..models import known_labels, known_preprocess, model_path

    shape = ints(args.input_shape) if args.input_shape else None
    model = load_model(model_path(args.model), shape)
    return model, known_preprocess(args.model), known_labels(args.model)


def _image_names(args) -> list[str]:
    """--images, or the first two sample photos when neither --images nor --inputs is given."""
    from ..images import SAMPLE_IMAGES

    return list(args.images or ([] if args.inputs else SAMPLE_IMAGES[:2]))


def _samples(args, model, base_pre):
    from ..images import load_inputs

    return load_inputs(model, _image_names(args), args.inputs, _preprocess(args, base_pre))


def _plan_for(args, model, pre=None):
    """--plan, --algorithm (where the command has it), the plan shipped for this model and
    target (and its database, where the command takes --database), or else a predicted plan
    (tune/predict.py: the densities from a profile of --images/--inputs when given, else the
    defaults; the fixed rule when the shipped cost model is missing or corrupt)."""
    from ..compile import resolve_plan
    from ..shipped import shipped_plan
    from ..target import target_key

    algorithm = getattr(args, "algorithm", None)
    if algorithm and not args.plan:
        return _forced_plan(args, model, pre, algorithm)
    if not args.plan and not algorithm:
        found = shipped_plan(args.model, args.target)
        if found is None:
            from ..tune.predict import predict_plan

            samples = _samples(args, model, pre) if (args.images or args.inputs) else None
            # a cost model named on the command line that cannot be read is an error; the shipped
            # one missing or corrupt gives the fixed rule, with the error said
            plan = predict_plan(model, args.target, samples, args.cost_model, fallback=args.cost_model is None,
                                log=lambda s: _log(f"tvm-sparseconv: error: {s}"))
            _log(tables.predicted_line(args.model, target_key(args.target), plan))
            return plan
        args.plan = found[0]
        database = None
        if hasattr(args, "database"):
            args.database = database = args.database or found[1]
        _log(f"using the shipped plan {found[0]}" + (f" and database {database}" if database else ""))
    return resolve_plan(model, args.plan, algorithm, args.target)


def _forced_plan(args, model, pre, algorithm, flag: str = "--algorithm"):
    """The plan of --algorithm A (or bench's --baseline A): A on every layer it takes, its knobs
    and layouts predicted for the target (tune/predict.py; the densities of --images for a
    sparse A), its defaults without the cost model."""
    from ..tune.predict import predict_plan

    samples = _samples(args, model, pre) if (args.images or args.inputs) else None
    cost_model = getattr(args, "cost_model", None)
    plan = predict_plan(model, args.target, samples, cost_model, fallback=cost_model is None,
                        log=lambda s: _log(f"tvm-sparseconv: error: {s}"), algorithm=algorithm)
    _log(tables.forced_line(f"{flag} {algorithm}", plan))
    return plan


# -- commands ---------------------------------------------------------------------------------

def cmd_layer(args) -> int:
    from ..algorithms import ALGORITHMS
    from ..conv import Conv2DSpec
    from ..layer import run_layer, synthesize_activation, synthesize_weight
    from ..peers import available_peers

    if args.input:
        for p in (args.input, args.weight):
            if p is None or not os.path.isfile(p):
                raise FileNotFoundError(f"--input needs --weight, and both must exist: {p}")
        x, w = np.load(args.input), np.load(args.weight)
        if x.ndim == 3:
            x = x[None]
        spec = Conv2DSpec.from_shapes(x.shape, w.shape, args.stride, args.padding, args.dilation, args.groups)
    else:
        n, c, h, wd = ints(args.shape)
        kh, kw = ints(args.kernel, 2)
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
    report["command"] = _command_line(args)
    return _emit(args, report, tables.print_layer_table)


def cmd_profile(args) -> int:
    from ..profile import profile

    model, pre, _ = _load_model(args)
    samples = _samples(args, model, pre)
    _log(f"profiling {args.model} on {len(samples)} samples ...")
    layers, _, _ = profile(model, samples, args.target, args.algorithm)
    res = {"model": args.model, "input_shape": list(model.input_shape), "samples": len(samples),
           "layers": [l.to_dict() for l in layers]}
    return _emit(args, res, lambda r: tables.print_profile_table(r, model.layout))


def cmd_compile(args) -> int:
    import math

    from ..compile import build_isolated
    from ..runner import write_sidecar
    from ..target import make_target

    model, pre, labels = _load_model(args)
    plan = _plan_for(args, model, pre)
    target = make_target(args.target)
    _log(f"compiling {args.model} for {target} ...")
    # in the worker: a compiler crash is an error naming the layer, not the end of this process
    b = build_isolated(model, plan, target, args.database, path=args.output, timeout=math.inf,
                       cc=args.cross_compiler)
    write_sidecar(args.output, model, _preprocess(args, pre), labels, b.applied, target)
    tables.print_compiled(args.output, b.counts(), b.transforms)
    return 0


def cmd_run(args) -> int:
    from ..images import load_inputs
    from ..runner import load, top_k

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
        tables.print_run(name, lat, y.shape, top_k(y, m.labels, 5) if y.size <= 10000 else None)
    return 0


def cmd_bench(args) -> int:
    from ..bench import bench_model
    from ..frontend import at_batch
    from ..images import batch_input

    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch takes a positive size, got {args.batch}")
    model, pre, _ = _load_model(args)
    samples = _samples(args, model, pre)
    plan = _plan_for(args, model, pre)  # made (or checked) at the model's own batch: it applies at any
    x = samples[0]
    baseline_plan = (None if args.baseline.endswith(".json") else
                     _forced_plan(args, model, pre, args.baseline, "--baseline"))
    if args.batch is not None:
        model, x = at_batch(model, args.batch), batch_input(samples, args.batch)
    res = bench_model(model, x, plan, None, args.database, args.target, args.threads,
                      args.baseline, args.repeat, not args.no_peers, log=_log, ops=args.ops, rounds=args.rounds,
                      baseline_plan=baseline_plan)
    res = {"model": args.model, "command": _command_line(args), **res}
    _emit(args, res, lambda r: tables.print_bench_table(r, args.repeat))
    # a wrong result of ours fails the command (the WARNING said which), so that scripts notice
    return 1 if any(r.get("wrong") and r["name"].startswith("tvm-sparseconv") for r in res["rows"]) else 0


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def cmd_memory(args) -> int:
    from ..memory import measure_formats, measure_model

    if min(args.batch) < 1:
        raise ValueError(f"--batch takes positive sizes, got {args.batch}")
    model, pre, _ = _load_model(args)
    plan = _plan_for(args, model, pre)
    plan.choices(model.sites)  # a plan for another model: its PlanError now, before any image or build
    samples = _samples(args, model, pre)
    used = args.plan and (os.path.relpath(args.plan) if os.path.isfile(args.plan) else args.plan)
    res = {"model": args.model, "command": _command_line(args), "plan": used or f"all {args.algorithm}",
           "images": _image_names(args) + list(args.inputs),
           **measure_model(model, plan, samples, tuple(args.batch), args.target, args.threads, args.baseline,
                           args.database, not args.no_peers, args.repeat, log=_log,
                           baseline_plan=_forced_plan(args, model, pre, args.baseline, "--baseline"))}
    if args.formats:
        _log(f"formats: {args.model} on {len(samples)} samples ...")
        res["formats"] = measure_formats(model, samples, args.target)
    if args.json:
        _write(args.json, json.dumps(res, indent=1) + "\n")
    if args.markdown:
        _write(args.markdown, tables.memory_markdown(res, level=1))
    tables.print_memory(res)
    return 0


def cmd_refine(args) -> int:
    from ..tune.cost_model import CostModelError
    from ..tune.predict import predict_plan
    from ..tune.refine import beside_prediction, refine_plan

    model, pre, _ = _load_model(args)
    samples = _samples(args, model, pre)
    plan = _plan_for(args, model, pre)
    others = {}
    if plan.model.get("plan") != "predicted":  # a given or shipped plan: is the prediction faster here?
        try:
            others = beside_prediction(plan, predict_plan(model, args.target, samples, args.cost_model,
                                                          fallback=False))
        except CostModelError as e:
            if args.cost_model:  # named on the command line: an error, as everywhere
                raise
            _log(f"refine: no predicted plan to build beside the plan ({e})")
    refined, report = refine_plan(model, plan, samples[0], args.target, rounds=args.rounds, log=_log, others=others)
    refined.save(args.output)
    with open(args.output + ".refine.json", "w") as f:
        json.dump(report, f, indent=1)
    tables.print_refined(args.model, report, args.rounds, args.output)
    return 0


def cmd_tune(args) -> int:
    import time as _time

    from ..tune.tuner import TuneConfig, Tuner

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
                     rpc=rpc, cache=args.cache, layouts=not args.no_layouts, refine=not args.no_refine,
                     refine_rounds=args.refine_rounds, recheck_rounds=args.recheck_rounds,
                     search="exhaustive" if args.exhaustive else "model",
                     top_k=args.top_k, explore=args.explore, cost_model=args.cost_model,
                     **({"algorithms": algorithms} if algorithms else {}))
    _log(f"tuning {args.model} into {run_dir}")
    try:
        plan = Tuner(model, samples, run_dir, args.target, cfg, model_name=args.model, log=_log).run()
    except KeyboardInterrupt:
        _log(f"interrupted: finished measurements are in {run_dir}; continue with --resume {run_dir}")
        return 130
    db = os.path.join(run_dir, "database")
    tables.print_tuned(args.model, run_dir, [l.algorithm for l in plan.layers], db if os.path.isdir(db) else None)
    return 0


def cmd_report(args) -> int:
    from ..tune.report import write_report

    tables.print_wrote(write_report(args.run_dir))
    return 0


def cmd_fuzz(args) -> int:
    from ..algorithms import ALGORITHMS
    from ..fuzz import CampaignResult, run_campaign
    from ..tune.log import write_atomically

    algorithms = ALGORITHMS if args.algorithms == "all" else tuple(a.strip() for a in args.algorithms.split(","))
    only = ints(args.only) if args.only else None
    resume, out = None, args.json or args.resume
    if args.resume:
        with open(args.resume) as f:  # a missing file: FileNotFoundError, said as such
            try:
                d = json.load(f)
            except ValueError as e:
                raise ValueError(f"{args.resume} is not the JSON of a fuzz campaign ({e})") from None
        resume = CampaignResult.from_dict(d, args.resume)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def save(res) -> None:  # whole, after each layer: a kill loses at most the layers under way
        if out:
            write_atomically(out, lambda f: json.dump({"command": _command_line(args), **res.to_dict()}, f, indent=1))

    res = run_campaign(args.seed, args.layers, only, algorithms, args.target, args.knob_dicts, args.bounds_check,
                       args.jobs, args.timeout, on_failure=tables.print_fuzz_failure, resume=resume, on_layer=save)
    save(res)
    tables.print_fuzz_summary(res.to_dict())
    return 130 if res.interrupted else 1 if res.failed else 0


# the layer whose default knobs ``algorithms`` lists: a 3x3 conv in the middle of a ResNet's first stage
REPRESENTATIVE_LAYER = ((1, 64, 56, 56), (64, 64, 3, 3))


def _summary(algo) -> str:
    """The first sentence of the docstring of ``algo``'s module (its first paragraph, which may
    wrap), without a leading "name: "."""
    import inspect

    doc = inspect.getdoc(sys.modules[type(algo).__module__]) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    return text[len(algo.name) + 2:] if text.startswith(f"{algo.name}: ") else text


def cmd_algorithms(args) -> int:
    from ..algorithms import ALGORITHMS, get_algorithm
    from ..conv import Conv2DSpec
    from ..cpu import cpu_of

    spec = Conv2DSpec.from_shapes(*REPRESENTATIVE_LAYER, 1, 1)
    cpu = cpu_of(None)
    rows = []
    for name in ALGORITHMS:
        a = get_algorithm(name)
        rows.append({"name": name, "sparse": a.sparse, "metaschedule": a.metaschedule,
                     "fuses_residual": a.fuses_residual, "groups": a.groups,
                     "knobs": list(a.default_knobs(spec, cpu)), "description": _summary(a)})
    if args.markdown:
        tables.print_algorithms_markdown(rows)
    else:
        tables.print_algorithms(rows, spec.to_dict(), cpu.to_dict())
    return 0


def _saved_result(path: str) -> tuple[str, dict]:
    """("bench", "layer" or "memory", the dict) of a file that ``bench --json``, ``layer --json``
    or ``memory --json`` wrote."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
    if isinstance(d, dict) and "rows" in d and "speedup_vs_best" in d:
        return "bench", d
    if isinstance(d, dict) and "layer" in d and "results" in d:
        return "layer", d
    if isinstance(d, dict) and "batches" in d and "model" in d:
        return "memory", d
    raise ValueError(f"{path} is not the output of `bench --json`, `layer --json` or `memory --json`")


def cmd_results(args) -> int:
    saved = [(path, *_saved_result(path)) for path in args.files]
    text = tables.results_markdown(saved)
    if args.output:
        _write(args.output, tables.results_header(args.files) + "\n\n" + text)
        tables.print_wrote(args.output)
    else:
        tables.print_text(text)
    return 0


def cmd_cost_model(args) -> int:
    from ..tune.cost_model import CostModel, CostModelError, TrainingRun, load_cost_model, shipped_runs

    if args.action == "show":
        m = load_cost_model(args.file)
        tables.print_cost_model(m.path, m.trained_on, len(m.names), m.rounds)
        return 0
    paths = args.runs or shipped_runs()
    runs = [TrainingRun.read(p) for p in paths]
    if args.action == "train":
        m = CostModel.train(runs)
        m.save(args.output)
        same = None
        if not args.runs:  # the shipped runs: does it reproduce the shipped model's predictions?
            try:
                shipped = load_cost_model()
                cands = [c for r in runs for c, _, _ in r.rows]
                same = bool(np.array_equal(shipped.predict_ms(cands), m.predict_ms(cands)))
            except CostModelError:  # no shipped model to compare with
                same = None
        tables.print_cost_model(args.output, m.trained_on, len(m.names), m.rounds, same)
        return 0
    from ..tune.evaluate import end_to_end, offline

    _log(f"offline: leaving each CPU out of {len(runs)} runs ...")
    res = {"command": _command_line(args), "offline": offline(runs)}
    if args.end_to_end:
        tuned = {}
        for t in args.tuned:
            name, sep, path = t.partition("=")
            if not sep or not path:
                raise ValueError(f"--tuned takes MODEL=PLAN.json, got {t!r}")
            tuned[name] = path
        res["end_to_end"] = end_to_end(args.models, runs, args.target, args.images or None, tuned, args.repeat,
                                       args.rounds, log=_log, inputs=args.inputs or None)
    return _emit(args, res, tables.print_cost_model_evaluation)


COMMANDS = {"layer": cmd_layer, "profile": cmd_profile, "compile": cmd_compile, "bench": cmd_bench,
            "memory": cmd_memory, "refine": cmd_refine, "tune": cmd_tune, "report": cmd_report, "run": cmd_run,
            "algorithms": cmd_algorithms, "results": cmd_results, "fuzz": cmd_fuzz, "cost-model": cmd_cost_model}


def run(args, argv: list[str]) -> int:
    """Ready ``args`` (parsed from ``argv``) and run its command."""
    from ..target import default_target, set_num_threads, target_json

    args.argv = list(argv)
    args.threads = set_num_threads(getattr(args, "threads", 0))
    if hasattr(args, "target"):
        # no --target: TVMS_TARGET when it is set (make_target's default), else this CPU
        given = args.target or os.environ.get("TVMS_TARGET", "").strip() or None
        args.target_str = given or json.dumps(default_target())
        args.target = target_json(given) if given and given.strip().startswith("{") else (given or default_target())
    for k in ("stride", "dilation"):
        if hasattr(args, k):
            setattr(args, k, ints(getattr(args, k), 2))
    if hasattr(args, "padding"):
        args.padding = ints(args.padding)
    return COMMANDS[args.command](args)
