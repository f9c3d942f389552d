"""Compile one layer with one algorithm, or a layout transform, and run or time it on TVM tensors."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import tvm
import tvm_ffi
from tvm.script import tirx as T

from .algorithms import get_algorithm
from .algorithms.base import Algorithm, Stage
from .algorithms.layout import transform_stage
from .conv import Conv2DSpec, Epilogue, ConvSpecError, UnsupportedConvError
from .cpu import cpu_of
from .layout import layout_shape
from .passes.stack_scratch import TIR_PIPELINE
from .reference.layout import from_layout, to_layout
from .reference.storage import Storage
from .stages import apply_database, stage_func, stage_symbol
from .target import export_library, make_target


def stage_module(name: str, stages: list[Stage]) -> tvm.IRModule:
    """An IRModule with every stage as a public PrimFunc named ``<name>_<stage>`` (name: the
    algorithm's), each in the form a rewritten model holds it (stages.stage_func)."""
    funcs = {}
    for st in stages:
        sym = stage_symbol(name, st.name)
        funcs[sym] = stage_func(st).with_attr("global_symbol", sym)
    return tvm.IRModule(funcs)


@dataclass
class Timing:
    """Median milliseconds per stage kind."""

    encode_ms: float
    multiply_ms: float
    stages_ms: dict

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.multiply_ms


class CompiledStages:
    """Stages compiled into one library (their functions ``<name>_<stage>``) for ``target``,
    with a buffer for each stage output allocated once; a subclass puts the inputs into
    ``buffers`` (``x`` at least) and says how to copy them in (``set_input``). With an RPC
    ``session`` the library is exported, uploaded and run on the remote CPU instead."""

    def __init__(self, name: str, stages: list[Stage], target, database=None, session=None):
        self.name, self.stages, self.target = name, stages, make_target(target)
        mod = stage_module(name, stages)
        if database is not None:
            mod = apply_database(mod, database, self.target)
        self.executable = tvm.compile(mod, target=self.target, tir_pipeline=TIR_PIPELINE)
        self.session = session
        if session is None:
            self.lib, self.dev = self.executable.mod, tvm.cpu(0)
        else:
            self.lib, self.dev = _upload(self.executable, session, self.target), session.cpu(0)
        self.buffers: dict[str, tvm.runtime.Tensor] = {}
        for st in self.stages:
            for b in st.outputs:
                self.buffers[b.name] = tvm.runtime.empty(b.shape, b.dtype, self.dev)

    def poison(self) -> None:
        """Fill every buffer the stages write ("y" and the intermediates) with NaN (an int buffer
        with -1: it cannot hold a NaN, and -1 is no valid pointer or index), so that an output
        element a kernel leaves unwritten shows as a NaN where the reference has a number,
        whatever the buffer held before."""
        for st in self.stages:
            for b in st.outputs:
                dtype = np.dtype(b.dtype)
                self.buffers[b.name].copyfrom(np.full(b.shape, np.nan if dtype.kind == "f" else -1, dtype))

    def _args(self, st: Stage):
        return [self.buffers[n] for n in st.inputs] + [self.buffers[b.name] for b in st.outputs]

    def run(self) -> None:
        self._run(self.stages)

    def _run(self, stages) -> None:
        for st in stages:
            self.lib[stage_symbol(self.name, st.name)](*self._args(st))

    def produced(self) -> dict[str, np.ndarray]:
        """Every stage output of the last run, as NumPy arrays."""
        return {b.name: self.buffers[b.name].numpy() for st in self.stages for b in st.outputs}

    def time(self, x: np.ndarray | None = None, repeat: int = 7, min_repeat_ms: float = 40,
             cache: str = "warm") -> Timing:
        """Median time per stage with time_evaluator (first call discarded), in ms.

        ``cache`` (CACHE_MODES) says what is in the caches when a stage starts:
        - "warm": each repeat runs a stage back to back for at least ``min_repeat_ms``; its
          inputs, weights and outputs sit in L1/L2 as when the layer is timed alone;
        - "fresh" (as inside a model): before each single run x is rewritten from a saved copy by
          a copy split over the threads, as the op before leaves it (each core holds the part it
          wrote), the stages before this one run again (a multiply reads what its encoder just
          wrote), and this stage's outputs are flushed from the caches (in a model the other
          layers have evicted them). The weights stay warm. Local only: the preproc is a
          callback into this process, which RPC servers cannot make;
        - "cold": before each single run every argument but the first (the weights, outputs and
          other inputs) is flushed from the caches, as MetaSchedule's enable_cpu_cache_flush.
        fresh and cold take 4x the repeats, one run each."""
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache == "fresh" and self.session is not None:
            raise ValueError("cache 'fresh' rewrites inputs from this process: not over RPC (use 'cold')")
        if x is not None:
            self.set_input(x)
        per = {}
        enc = mul = 0.0
        refresh_x = _refresher(self.buffers["x"], self.target) if cache == "fresh" else None
        for i, st in enumerate(self.stages):
            sym = stage_symbol(self.name, st.name)
            if cache == "warm":
                fe = self.lib.time_evaluator(sym, self.dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
            else:
                pre = (_register_preproc(lambda i=i: self._fresh(refresh_x, i)) if cache == "fresh"
                       else "cache_flush_cpu_non_first_arg")
                fe = self.lib.time_evaluator(sym, self.dev, number=1, repeat=4 * repeat, f_preproc=pre)
            ms = float(np.median(fe(*self._args(st)).results)) * 1e3
            per[st.name] = ms
            if st.kind == "encode":
                enc += ms
            else:
                mul += ms
        # leave the buffers holding the result of this input
        self.run()
        return Timing(enc, mul, per)

    def _fresh(self, refresh_x, i: int) -> None:
        """Before a "fresh" run of stage i: x rewritten, stages < i run, stage i's outputs flushed."""
        refresh_x()
        self._run(self.stages[:i])
        _FLUSH(self.buffers["x"], *(self.buffers[b.name] for b in self.stages[i].outputs))  # all but the 1st


class CompiledLayer(CompiledStages):
    """One conv layer compiled with one algorithm.

    ``layer(x)`` runs it on an N x C x H x W float32 array and returns N x M x Oh x Ow;
    with ``residual``, ``layer(x, res)`` adds res (N x M x Oh x Ow) before the ReLU; ``clip``
    (with ``relu``) bounds the output to [0, clip]; ``slope`` (with ``relu``) makes it a LeakyReLU;
    ``gate`` multiplies it by a gate of itself
    (conv.Epilogue). Arrays in and out are NCHW; where the knobs hold x or y in channel blocks
    (``layout_in``, ``layout_out``: Algorithm.layouts), the buffers ``x``, ``res`` and ``y`` are
    blocked, and x and res are blocked (reference.layout.to_layout) as they are copied in, y
    unblocked as it is read out.
    Constants (re-laid-out weights) are uploaded once; intermediate buffers are
    allocated once at their worst-case size and reused (CompiledStages, which also runs an
    RPC ``session``'s remote copy).
    """

    def __init__(self, algorithm: str | Algorithm, spec: Conv2DSpec, weight: np.ndarray,
                 bias: np.ndarray | None = None, relu: bool = False, target=None,
                 knobs: Mapping | None = None, database=None, session=None, residual: bool = False,
                 clip: float | None = None, gate: str | None = None, slope: float | None = None):
        self.algorithm = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
        self.spec = spec
        self.algorithm.check(spec)
        if residual and not self.algorithm.fuses_residual:
            raise UnsupportedConvError(f"{self.algorithm.name} cannot fuse a residual add into its epilogue")
        weight = np.asarray(weight, np.float32)
        if weight.shape != spec.w_shape:
            raise ConvSpecError(f"weight shape {weight.shape} does not match the layer's {spec.w_shape}")
        self.epilogue = Epilogue(bias=bias is not None, relu=bool(relu), residual=bool(residual), clip=clip, gate=gate,
                                 slope=slope)
        target = make_target(target)
        self.knobs = self.algorithm.knobs(spec, knobs, target)
        self.layout_in, self.layout_out = self.algorithm.layouts(spec, self.knobs)
        super().__init__(self.algorithm.name, self.algorithm.stages(spec, self.epilogue, self.knobs, target), target,
                         database, session)
        consts = self.algorithm.constants(spec, weight, bias, self.knobs)
        self.buffers.update({k: tvm.runtime.tensor(np.ascontiguousarray(v), self.dev) for k, v in consts.items()})
        self.buffers["x"] = tvm.runtime.empty(layout_shape(spec.x_shape, self.layout_in), "float32", self.dev)
        if residual:  # zeros until set_input gives one
            self.buffers["res"] = tvm.runtime.tensor(
                np.zeros(layout_shape(spec.y_shape, self.layout_out), np.float32), self.dev)

    def set_input(self, x: np.ndarray, res: np.ndarray | None = None) -> None:
        """Copy in x (N x C x H x W) and res (N x M x Oh x Ow), each into its buffer's layout."""
        self._copy_in("x", x, self.spec.x_shape, self.layout_in, "input")
        if res is not None:
            if not self.epilogue.residual:
                raise ConvSpecError("this layer was built without residual=True: it takes no res input")
            self._copy_in("res", res, self.spec.y_shape, self.layout_out, "res")

    def _copy_in(self, name: str, a: np.ndarray, shape, layout: str, label: str) -> None:
        a = np.asarray(a)
        if a.shape != shape:
            raise ConvSpecError(f"{label} shape {a.shape} does not match the layer's {shape}")
        self.buffers[name].copyfrom(to_layout(np.ascontiguousarray(a, dtype=np.float32), layout))

    def output(self) -> np.ndarray:
        """y of the last run, N x M x Oh x Ow (unblocked when the kernel writes channel blocks)."""
        return from_layout(self.buffers["y"].numpy(), self.layout_out, self.spec.out_channels)

    def __call__(self, x: np.ndarray, res: np.ndarray | None = None) -> np.ndarray:
        if self.epilogue.residual and res is None:
            raise ConvSpecError("this layer was built with residual=True: call it with (x, res)")
        self.set_input(x, res)
        self.run()
        return self.output()

    def storage(self) -> Storage:
        """Stored elements/bytes of the representation the compiled stages built on the last run."""
        return self.algorithm.storage(self.spec, self.knobs, self.produced())


class CompiledTransform(CompiledStages):
    """The layout transform (algorithms/layout.py) of an N x C x H x W tensor from ``src`` to
    ``dst`` (one of them "nchw"), compiled for ``target``: ``t(x)`` takes an NCHW array and
    returns the transform's output as written (``dst``); ``time`` times it as it times a
    layer's stage."""

    def __init__(self, nchw_shape, src: str, dst: str, target=None, session=None):
        target = make_target(target)
        self.shape, self.src, self.dst = tuple(int(v) for v in nchw_shape), src, dst
        super().__init__("layout", [transform_stage(self.shape, src, dst, cpu_of(target))], target, session=session)
        self.buffers["x"] = tvm.runtime.empty(layout_shape(self.shape, src), "float32", self.dev)

    def set_input(self, x: np.ndarray) -> None:
        """Copy in x (N x C x H x W), held in ``src``."""
        self.buffers["x"].copyfrom(to_layout(np.ascontiguousarray(x, np.float32), self.src))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.set_input(x)
        self.run()
        return self.buffers["y"].numpy()


CACHE_MODES = ("warm", "fresh", "cold")
_PREPROC = "tvm_sparseconv.timing_preproc"
_FLUSH = tvm.get_global_func("cache_flush_cpu_non_first_arg")


@functools.lru_cache(maxsize=None)
def _flat_copy(n: int, dtype: str, target: str):
    """A compiled dst[:n] = src[:n], split in contiguous chunks over the thread pool."""
    chunk = 4096

    @T.prim_func
    def copy(a: T.handle, b: T.handle):
        T.func_attr({"tirx.noalias": True})
        src = T.match_buffer(a, (n,), dtype)
        dst = T.match_buffer(b, (n,), dtype)
        for c in T.parallel((n + chunk - 1) // chunk):
            for i in range(chunk):
                if c * chunk + i < n:
                    dst[c * chunk + i] = src[c * chunk + i]

    return tvm.compile(tvm.IRModule({"main": copy}), target=target, tir_pipeline=TIR_PIPELINE)["main"]


def _refresher(t: tvm.runtime.Tensor, target):
    """A callable that rewrites ``t`` from a copy of its contents now, split over the threads."""
    n = int(np.prod(t.shape))
    flat = t._create_view((n,))
    saved = tvm.runtime.empty((n,), t.dtype, t.device)
    saved.copyfrom(flat)
    copy = _flat_copy(n, str(t.dtype), str(target))
    return lambda: copy(saved, flat)


def _register_preproc(fn) -> str:
    """``fn`` as time_evaluator's f_preproc (a global function, its name replaced per call)."""
    def preproc(*_args) -> None:  # returns nothing: the caller reads no value
        fn()

    tvm_ffi.register_global_func(_PREPROC, preproc, override=True)
    return _PREPROC


def _upload(executable, session, target):
    """Export to a temporary .so (cross-linked when ``target`` is another architecture's),
    upload it through the RPC session and load it there.

    Each upload gets its own name: overwriting a library the server has loaded crashes it.
    """
    import os
    import tempfile
    import uuid

    name = f"layer-{uuid.uuid4().hex[:12]}.so"
    with tempfile.TemporaryDirectory(prefix="tvms-rpc-") as d:
        path = os.path.join(d, name)
        export_library(executable, path, target)
        session.upload(path)
    return session.load_module(name)
