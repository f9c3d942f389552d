"""End-to-end latency of a compiled model against its dense build and the peers, in one run."""
from __future__ import annotations

import numpy as np
import tvm

from .compile import Build, build_many, resolve_plan
from .cpu import cpu_of
from .frontend import Model
from .measure import max_abs_error, time_calls, vm_latency_ms
from .plan import Plan
from .peers import PeerError, available_peers, run_model_peer
from .target import make_target


# a whole model's output may differ from the reference by this share of its largest value
# (float32 sums in another order over many layers); far more is a wrong result, not rounding
MODEL_TOLERANCE = 1e-3


def wrong_output(error: float, ref: np.ndarray) -> bool:
    """Whether a model's max_abs_error against ``ref`` is over MODEL_TOLERANCE of its largest
    finite value (inf, NaN or Inf elsewhere, is always over)."""
    return not error <= MODEL_TOLERANCE * max(1.0, float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0)))


def op_breakdown(b: Build, x: np.ndarray, runs: int = 20) -> dict[str, float]:
    """Mean wall-clock ms per inference of each kind of call inside the model built as ``b``
    (time_calls): ``conv <algorithm>`` for our kernels (b.kernels), the PrimFunc's name without
    its numeric suffix for the other ops, ``vm.builtin.*`` for the VM's own work."""
    total = {}
    for name, t in time_calls(b.vm(), tvm.runtime.tensor(np.ascontiguousarray(x, np.float32)), runs):
        kind = f"conv {b.kernels[name][1]}" if name in b.kernels else name.rstrip("0123456789")
        total[kind] = total.get(kind, 0.0) + t
    return {k: v / runs * 1e3 for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def bench_model(model: Model, x: np.ndarray, plan=None, algorithm: str | None = None, database=None, target=None,
                threads: int = 0, baseline: str = "dense", repeat: int = 10, peers: bool = True,
                log=lambda s: None, ops: bool = False, rounds: int = 1, baseline_plan: Plan | None = None) -> dict:
    """Rows of {name, ms, max_abs_error vs onnxruntime or the baseline, wrong (wrong_output: also
    logged as a WARNING), speedup of the plan over it, skipped}; with ``ops``, also ``ops``: the
    plan build's op_breakdown. The result also records what ran: ``input_shape``, ``threads``, ``rounds`` and ``cpu`` (cpu.CPU.to_dict() of the target).

    ``baseline``: an algorithm (the build with it on every layer: ``baseline_plan`` when given,
    as the CLI predicts its knobs, else Plan.uniform's defaults) or the path of another plan.
    ``rounds`` > 1 times every build and peer once per round, in turn, so that the machine's
    drift hits them alike: ``ms`` is the median of the rounds' medians, ``plan_speedup`` the
    median of the per-round ratios (``plan_speedup_range`` their min and max).

    A peer that cannot run the model (peers.PeerError, in any round) is a row with ``skipped``
    its one-line reason and None for ms, max_abs_error and the speed-ups; the other rows, and
    ``speedup_vs_best`` over those that ran, are as without it. ``speedup_vs_best`` is the
    plan's over the fastest other row (the baseline build included), ``speedup_vs_peers`` over
    the fastest peer that ran (onnxruntime, PyTorch; None if none did). ``skipped`` is None on
    the rows that ran. A build that fails is an error, not a skip: the builds are what is
    measured."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    target = make_target(target)
    if str(baseline).endswith(".json"):
        base = ("baseline plan", resolve_plan(model, baseline, None, target))
    else:
        base = (f"all {baseline}", baseline_plan or resolve_plan(model, None, baseline, target))
    builds = [("plan", resolve_plan(model, plan, algorithm, target)), base]
    built = _build_all(model, dict(builds), target, database, log)
    breakdown = op_breakdown(built["plan"], x) if ops else None
    timers = [(f"tvm-sparseconv {name}", b.counts(), lambda vm=b.vm(): vm_latency_ms(vm, x, repeat))
              for name, b in built.items()]  # (name, layers, () -> (y, ms))
    if peers and model.onnx_path:
        for peer in available_peers():
            timers.append((peer, "", lambda peer=peer: run_model_peer(peer, model.onnx_path, x, threads, repeat)))
    times = np.zeros((rounds, len(timers)))
    ys, skipped = {}, {}
    for r in range(rounds):
        for k, (name, _, timed) in enumerate(timers):
            if name in skipped:
                continue
            log(f"timing {name}" + (f" (round {r + 1} of {rounds})" if rounds > 1 else ""))
            try:
                ys[name], times[r, k] = timed()
            except PeerError as e:  # only the peers raise it
                log(f"{name} skipped: {e}")
                skipped[name] = str(e)
                ys.pop(name, None)  # an earlier round's output is no reference
    ref_name = "onnxruntime" if "onnxruntime" in ys else timers[1][0]
    ref = ys[ref_name]
    ratios = times / times[:, :1]
    rows = []
    for k, (name, layers, _) in enumerate(timers):
        if name in skipped:
            rows.append({"name": name, "ms": None, "layers": layers, "max_abs_error": None, "wrong": None,
                         "plan_speedup": None, "plan_speedup_range": None, "skipped": skipped[name]})
            continue
        err = max_abs_error(ys[name], ref)
        wrong = wrong_output(err, ref)
        if wrong:
            log(f"WARNING: {name}'s output differs from {ref_name}'s by {err:.3g}, over the tolerance "
                f"({MODEL_TOLERANCE:g} of the largest output): a wrong result, please report it")
        rows.append({"name": name, "ms": float(np.median(times[:, k])), "layers": layers, "max_abs_error": err,
                     "wrong": wrong, "plan_speedup": float(np.median(ratios[:, k])),
                     "plan_speedup_range": [float(ratios[:, k].min()), float(ratios[:, k].max())], "skipped": None})
    t_plan = rows[0]["ms"]
    best_other = min((r["ms"] for r in rows[1:] if r["ms"] is not None), default=t_plan)
    peer_ms = [r["ms"] for r in rows[len(built):] if r["ms"] is not None]
    res = {"rows": rows, "speedup_vs_best": best_other / t_plan,
           "speedup_vs_peers": min(peer_ms) / t_plan if peer_ms else None, "input_shape": list(model.input_shape),
           "threads": threads, "rounds": rounds, "cpu": cpu_of(target).to_dict()}
    if ops:
        res["ops"] = breakdown
    return res


def _build_all(model: Model, plans: dict, target, database, log) -> dict[str, Build]:
    """{name: Build} of ``plans`` in their order, compiled side by side (compile.build_many); a
    build that crashes is an error: the builds are what is measured."""
    log("compiling: " + ", ".join(plans))
    built = {}
    for name, b, seconds in build_many(model, plans, target, database):
        if isinstance(b, Exception):
            raise b
        log(f"compiled: {name} ({seconds:.0f} s)")
        built[name] = b
    return {name: built[name] for name in plans}


def time_plans(model: Model, x: np.ndarray, plans: dict, target=None, database=None, repeat: int = 10,
               rounds: int = 3, log=lambda s: None) -> list[dict]:
    """Each plan of ``plans`` ({name: Plan}) compiled and timed on ``x`` in ``rounds`` interleaved
    rounds (every plan once per round, in turn: the machine's drift hits all alike). One row per
    plan: {name, ms (median of the rounds' medians), ms_rounds, layers (how many layers each
    algorithm computes), max_abs_error (against the first plan's output)}."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    target = make_target(target)
    builds = list(_build_all(model, plans, target, database, log).items())
    times = np.zeros((rounds, len(builds)))
    ys = {}
    for r in range(rounds):
        for k, (name, b) in enumerate(builds):
            log(f"timing {name}" + (f" (round {r + 1} of {rounds})" if rounds > 1 else ""))
            ys[name], times[r, k] = vm_latency_ms(b.vm(), x, repeat)
    ref = ys[builds[0][0]]
    return [{"name": name, "ms": float(np.median(times[:, k])), "ms_rounds": times[:, k].tolist(),
             "layers": b.counts(), "max_abs_error": max_abs_error(ys[name], ref)}
            for k, (name, b) in enumerate(builds)]
