"""End-to-end latency of a compiled model against its dense build and the peers, in one run."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .compile import build_isolated, resolve_plan
from .frontend import Model
from .layer import max_abs_error
from .peers import available_peers, run_model_peer
from .target import make_target


def vm_latency_ms(vm: relax.VirtualMachine, x: np.ndarray, repeat: int = 10) -> tuple[np.ndarray, float]:
    xt = tvm.runtime.tensor(np.ascontiguousarray(x, np.float32))
    out = vm["main"](xt)
    y = (out if hasattr(out, "numpy") else out[0]).numpy()
    fe = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=200)
    return y, float(np.median(fe(xt).results)) * 1e3


def time_calls(vm: relax.VirtualMachine, x: tvm.runtime.Tensor, runs: int) -> list[tuple[str, float]]:
    """(name, seconds) of every call the VM makes in ``runs`` inferences of ``x``, in order (a VM
    instrument around each call; one inference first, untimed). Caches are as they are in a real
    inference, unlike a kernel timed alone."""
    import time

    calls, start = [], [0.0]

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            start[0] = time.perf_counter()
        else:
            calls.append((name, time.perf_counter() - start[0]))
        return 0

    vm["main"](x)
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            vm["main"](x)
    finally:
        # None removes it: a no-op Python instrument left in place costs ~1.5 ms per ResNet-50
        # inference (2 callbacks per call)
        vm.set_instrument(None)
    return calls


def kernel_algorithm(name: str) -> str | None:
    """The algorithm whose stage a VM call of this PrimFunc name is (``hybrid_encode1``:
    hybrid), None for other ops."""
    from .algorithms import ALGORITHMS

    return next((a for a in ALGORITHMS if name.startswith(a + "_")), None)


def op_breakdown(vm: relax.VirtualMachine, x: np.ndarray, runs: int = 20) -> dict[str, float]:
    """Mean wall-clock ms per inference of each kind of call inside the model (time_calls):
    ``conv <algorithm>`` for our kernels, the PrimFunc's name without its numeric suffix for
    the other ops, ``vm.builtin.*`` for the VM's own work."""
    total = {}
    for name, t in time_calls(vm, tvm.runtime.tensor(np.ascontiguousarray(x, np.float32)), runs):
        algo = kernel_algorithm(name)
        kind = f"conv {algo}" if algo else name.rstrip("0123456789")
        total[kind] = total.get(kind, 0.0) + t
    return {k: v / runs * 1e3 for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def bench_model(model: Model, x: np.ndarray, plan=None, algorithm: str | None = None, database=None, target=None,
                threads: int = 0, baseline: str = "dense", repeat: int = 10, peers: bool = True,
                log=lambda s: None, ops: bool = False, rounds: int = 1) -> dict:
    """Rows of {name, ms, max_abs_error vs onnxruntime or the baseline, speedup of the plan over it};
    with ``ops``, also ``ops``: the plan build's op_breakdown.

    ``baseline``: an algorithm (the build with it on every layer) or the path of another plan.
    ``rounds`` > 1 times every build and peer once per round, in turn, so that the machine's
    drift hits them alike: ``ms`` is the median of the rounds' medians, ``plan_speedup`` the
    median of the per-round ratios (``plan_speedup_range`` their min and max)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    target = make_target(target)
    is_plan = str(baseline).endswith(".json")
    builds = [("plan", resolve_plan(model, plan, algorithm, target)),
              ("baseline plan" if is_plan else f"all {baseline}",
               resolve_plan(model, baseline if is_plan else None, None if is_plan else baseline, target))]
    timers = []  # (name, layers, () -> (y, ms))
    for name, p in builds:
        log(f"compiling: {name}")
        lib, applied = build_isolated(model, p, target, database)
        vm = relax.VirtualMachine(lib, tvm.cpu())
        if ops and name == "plan":
            breakdown = op_breakdown(vm, x)
        counts = {}
        for a in applied.values():
            counts[a] = counts.get(a, 0) + 1
        timers.append((f"tvm-sparseconv {name}", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                       lambda vm=vm: vm_latency_ms(vm, x, repeat)))
    if peers and model.onnx_path:
        for peer in available_peers():
            timers.append((peer, "", lambda peer=peer: run_model_peer(peer, model.onnx_path, x, threads, repeat)))
    times = np.zeros((rounds, len(timers)))
    ys = {}
    for r in range(rounds):
        for k, (name, _, timed) in enumerate(timers):
            log(f"timing {name}" + (f" (round {r + 1} of {rounds})" if rounds > 1 else ""))
            ys[name], times[r, k] = timed()
    ref = ys.get("onnxruntime", ys[timers[1][0]])
    ratios = times / times[:, :1]
    rows = [{"name": name, "ms": float(np.median(times[:, k])), "layers": layers,
             "max_abs_error": max_abs_error(ys[name], ref), "plan_speedup": float(np.median(ratios[:, k])),
             "plan_speedup_range": [float(ratios[:, k].min()), float(ratios[:, k].max())]}
            for k, (name, layers, _) in enumerate(timers)]
    t_plan = rows[0]["ms"]
    best_other = min(r["ms"] for r in rows[1:]) if len(rows) > 1 else t_plan
    res = {"rows": rows, "speedup_vs_best": best_other / t_plan, "threads": threads, "rounds": rounds}
    if ops:
        res["ops"] = breakdown
    return res
