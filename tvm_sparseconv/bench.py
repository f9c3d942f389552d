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


def bench_model(model: Model, x: np.ndarray, plan=None, algorithm: str | None = None, database=None, target=None,
                threads: int = 0, baseline: str = "dense", repeat: int = 10, peers: bool = True,
                log=lambda s: None) -> dict:
    """Rows of {name, ms, max_abs_error vs onnxruntime or the baseline, speedup of the plan over it}."""
    target = make_target(target)
    rows = []
    builds = [("plan", resolve_plan(model, plan, algorithm, target)),
              (f"all {baseline}", resolve_plan(model, None, baseline, target))]
    for name, p in builds:
        log(f"compiling and timing: {name}")
        mod, applied = lower(model, p, target, database)
        vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        y, ms = vm_latency_ms(vm, x, repeat)
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
    return {"rows": rows, "speedup_vs_best": best_other / t_plan, "threads": threads}
