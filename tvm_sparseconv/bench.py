"""End-to-end latency of a compiled model against its dense build and the peers, in one run."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .compile import lower, resolve_plan
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


def op_breakdown(vm: relax.VirtualMachine, x: np.ndarray, runs: int = 20) -> dict[str, float]:
    """Mean wall-clock ms per inference of each kind of call inside the model (a VM instrument
    around every call): ``conv <algorithm>`` for our kernels, the PrimFunc's name without its
    numeric suffix for the other ops, ``vm.builtin.*`` for the VM's own work. Caches are as
    they are in a real inference, unlike a kernel timed alone."""
    import time

    from .algorithms import ALGORITHMS

    xt = tvm.runtime.tensor(np.ascontiguousarray(x, np.float32))
    vm["main"](xt)  # warm-up
    start, total = {}, {}

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            start[name] = time.perf_counter()
        else:
            algo = next((a for a in ALGORITHMS if name.startswith(a + "_")), None)
            kind = f"conv {algo}" if algo else name.rstrip("0123456789")
            total[kind] = total.get(kind, 0.0) + time.perf_counter() - start[name]
        return 0

    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            vm["main"](xt)
    finally:
        vm.set_instrument(lambda *a: 0)
    return {k: v / runs * 1e3 for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def bench_model(model: Model, x: np.ndarray, plan=None, algorithm: str | None = None, database=None, target=None,
                threads: int = 0, baseline: str = "dense", repeat: int = 10, peers: bool = True,
                log=lambda s: None, ops: bool = False) -> dict:
    """Rows of {name, ms, max_abs_error vs onnxruntime or the baseline, speedup of the plan over it};
    with ``ops``, also ``ops``: the plan build's op_breakdown."""
    target = make_target(target)
    rows = []
    builds = [("plan", resolve_plan(model, plan, algorithm, target)),
              (f"all {baseline}", resolve_plan(model, None, baseline, target))]
    for name, p in builds:
        log(f"compiling and timing: {name}")
        mod, applied = lower(model, p, target, database)
        vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        y, ms = vm_latency_ms(vm, x, repeat)
        if ops and name == "plan":
            breakdown = op_breakdown(vm, x)
        counts = {}
        for a in applied.values():
            counts[a] = counts.get(a, 0) + 1
        rows.append({"name": f"tvm-sparseconv {name}", "ms": ms, "y": y,
                     "layers": ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))})
    if peers and model.onnx_path:
        for peer in available_peers():
            log(f"timing {peer}")
            y, ms = run_model_peer(peer, model.onnx_path, x, threads, repeat)
            rows.append({"name": peer, "ms": ms, "y": y, "layers": ""})
    ref = next((r["y"] for r in rows if r["name"] == "onnxruntime"), rows[1]["y"])
    t_plan = rows[0]["ms"]
    for r in rows:
        r["max_abs_error"] = max_abs_error(r.pop("y"), ref)
        r["plan_speedup"] = r["ms"] / t_plan
    best_other = min(r["ms"] for r in rows[1:]) if len(rows) > 1 else t_plan
    res = {"rows": rows, "speedup_vs_best": best_other / t_plan, "threads": threads}
    if ops:
        res["ops"] = breakdown
    return res
