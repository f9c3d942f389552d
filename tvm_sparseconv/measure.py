"""Measuring: the error against a reference and the tolerance it is held to, the time of each
call inside a compiled model, and a progress line with ETA for long work. Used by layer, bench,
refine, the tuner and the fuzzer."""
from __future__ import annotations

import sys
import time

import numpy as np


def max_abs_error(y: np.ndarray, ref: np.ndarray) -> float:
    """Largest |y - ref| over finite entries; inf when NaN/Inf do not sit where the reference has them."""
    fin = np.isfinite(ref)
    if not np.array_equal(np.isnan(y), np.isnan(ref)) or not np.array_equal(y[~fin & ~np.isnan(ref)],
                                                                               ref[~fin & ~np.isnan(ref)]):
        return float("inf")
    return float(np.max(np.abs(y[fin] - ref[fin]), initial=0.0))


def tolerance(spec, ref: np.ndarray) -> float:
    """The largest max_abs_error a float32 kernel may have against the float64 ``ref`` of layer
    ``spec`` (a conv.Conv2DSpec): sums in another order lose more with a longer reduction, scaled
    by the largest finite output (an Inf in ref must not make every error pass)."""
    red = spec.in_channels // spec.groups * spec.kernel_h * spec.kernel_w
    scale = float(np.abs(ref[np.isfinite(ref)]).max(initial=1.0))
    return 1e-4 + 2e-5 * np.sqrt(red) * scale


def joined_outputs(outs) -> np.ndarray:
    """A model's outputs as one array, so that one max_abs_error covers them all: a single output
    (a NumPy array, a tvm Tensor or a torch tensor) as it is; several (a list, or a VM's tuple
    result, nested or not) raveled and concatenated in order."""
    leaves = []

    def walk(o):
        if hasattr(o, "numpy") or isinstance(o, np.ndarray):
            leaves.append(np.asarray(o.numpy() if hasattr(o, "numpy") else o))
        else:
            for item in o:
                walk(item)

    walk(outs)
    return leaves[0] if len(leaves) == 1 else np.concatenate([a.ravel() for a in leaves])


def vm_latency_ms(vm, x: np.ndarray, repeat: int = 10) -> tuple[np.ndarray, float]:
    """(joined_outputs, median ms of ``main`` on ``x``) of a relax.VirtualMachine (time_evaluator,
    at least 200 ms per repeat, first call discarded)."""
    import tvm

    xt = tvm.runtime.tensor(np.ascontiguousarray(x, np.float32))
    y = joined_outputs(vm["main"](xt))
    fe = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=200)
    return y, float(np.median(fe(xt).results)) * 1e3


def time_calls(vm, x, runs: int) -> list[tuple[str, float]]:
    """(function name, seconds) of every call a relax.VirtualMachine makes in ``runs`` inferences
    of the tensor ``x``, in order (a VM instrument around each call; one inference first,
    untimed). Caches are as they are in a real inference, unlike a kernel timed alone."""
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


class Progress:
    def __init__(self, phase: str, total: int, stream=None):
        self.phase, self.total, self.done = phase, max(int(total), 0), 0
        self.start = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def eta_s(self) -> float | None:
        if self.done == 0:
            return None
        return (time.monotonic() - self.start) / self.done * (self.total - self.done)

    def step(self, what: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        el = time.monotonic() - self.start
        eta = self.eta_s()
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        msg = (f"[{self.phase}] [{bar}] {self.done}/{self.total} elapsed {_hms(el)} ETA "
               f"{_hms(eta) if eta is not None else '?'} {what}")
        if self.tty:
            self.stream.write("\r" + msg[:150].ljust(150))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
