"""The jobs the tuner runs in its worker process (worker.py): each builds, checks against a
reference and times on this machine or, over RPC, on a remote one. A job that crashes its
process (an LLVM fatal error, a segfault) or hangs ends only that job.

Arrays come in NCHW; ``ref`` is the NumPy oracle's output and ``tol`` its tolerance
(measure.tolerance); ``cache`` is one of build.CACHE_MODES.
"""
from __future__ import annotations

import gc

import numpy as np

from ..build import CompiledLayer, CompiledTransform
from ..conv import Epilogue
from ..measure import max_abs_error


def _session(rpc):
    """An RPC session from the tracker ``rpc`` (host, port, key), or None locally. A session does
    not cross processes, so each job opens its own, and its server-side timeout bounds one job,
    not the whole tune. The job drops it, and every remote module, before it returns (a remote
    module holds its session in a reference cycle: collected now, the server is free for the
    next job instead of waiting for this session to time out)."""
    if not rpc:
        return None
    from tvm import rpc as tvm_rpc

    host, port, key = rpc
    return tvm_rpc.connect_tracker(host, int(port)).request(key, priority=1, session_timeout=600)


def _layer(a: str, spec, weight, bias, epilogue: Epilogue, target: str, knobs: dict, db: str | None,
           session) -> CompiledLayer:
    return CompiledLayer(a, spec, weight, bias, epilogue.relu, target, knobs, db, session, clip=epilogue.clip,
                         gate=epilogue.gate, slope=epilogue.slope)


def measure_transform(shape, src: str, dst: str, target: str, repeat: int, cache: str) -> dict:
    """Build the layout transform of an NCHW tensor of ``shape`` from ``src`` to ``dst``, check it
    against the NumPy twin and time it as a candidate's stage: the job Tuner._transform_ms runs."""
    from ..reference.layout import to_layout

    t = CompiledTransform(shape, src, dst, target)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if not np.array_equal(t(x), to_layout(x, dst)):
        return {"error": "wrong result"}
    return {"time_ms": t.time(x, repeat=repeat, cache=cache).total_ms}


def measure_candidate(a: str, spec, weight, bias, epilogue: Epilogue, target: str, knobs: dict, db: str | None,
                      x: np.ndarray, ref: np.ndarray, tol: float, repeat: int, cache: str, rpc) -> dict:
    """Build one candidate, check it against ``ref`` and time it: the job Tuner._measure_one runs.
    Over RPC the build still runs here; the library runs on a server of the tracker."""
    session, layer = _session(rpc), None
    try:
        layer = _layer(a, spec, weight, bias, epilogue, target, knobs, db, session)
        err = max_abs_error(layer(x), ref)
        if not err <= tol:
            return {"error": f"wrong result: max abs error {err:.3g}", "max_abs_error": err}
        t = layer.time(x, repeat=repeat, cache=cache)
        st = layer.storage()
        return {"time_ms": t.total_ms, "encode_ms": t.encode_ms, "multiply_ms": t.multiply_ms,
                "max_abs_error": err, "stored_elements": st.elements, "stored_bytes": st.bytes}
    finally:
        if rpc:
            session = layer = None
            gc.collect()


def time_in_rounds(cands: list[tuple[str, dict, str | None]], spec, weight, bias, epilogue: Epilogue,
                   target: str, x: np.ndarray, ref: np.ndarray, tol: float, repeat: int, cache: str,
                   rounds: int, rpc) -> list[dict]:
    """Build the candidates ``cands`` [(algorithm, knobs, MetaSchedule database or None)] of one
    layer, check each against ``ref``, then time them in ``rounds`` rounds, each candidate once
    per round (as measure_candidate times it), the order turned by one each round: the job
    Tuner.recheck runs. Per candidate {"times_ms": [one per round]} or {"error"}.

    Timed in turn within seconds, the candidates see the same state of the machine: a drift in
    its speed (a VM's neighbours, the clock) moves them together instead of ranking them."""
    session, layers, out = _session(rpc), [], []
    try:
        for a, knobs, db in cands:
            layer = None
            try:
                layer = _layer(a, spec, weight, bias, epilogue, target, knobs, db, session)
                err = max_abs_error(layer(x), ref)
                out.append({"times_ms": []} if err <= tol else {"error": f"wrong result: max abs error {err:.3g}"})
            except Exception as e:  # it was measured before; a failure now is its own, not the others'
                out.append({"error": f"{type(e).__name__}: {str(e).strip()[-300:]}"})
            layers.append(layer if "times_ms" in out[-1] else None)
        live = [i for i, l in enumerate(layers) if l is not None]
        for r in range(rounds if live else 0):
            for i in live[r % len(live):] + live[: r % len(live)]:
                out[i]["times_ms"].append(layers[i].time(x, repeat=repeat, cache=cache).total_ms)
        return out
    finally:
        if rpc:
            session = layer = None
            layers.clear()
            gc.collect()
