"""Compile one layer with one algorithm and run or time it on TVM tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import tvm

from .algorithms import get_algorithm
from .algorithms.base import Algorithm, Stage
from .conv import Conv2DSpec, Epilogue, ConvSpecError
from .reference.storage import Storage
from .target import make_target


def stage_symbol(algorithm: Algorithm, stage: Stage) -> str:
    return f"{algorithm.name}_{stage.name}"


def stage_module(algorithm: Algorithm, stages: list[Stage]) -> tvm.IRModule:
    """An IRModule with every stage as a public PrimFunc named ``<algorithm>_<stage>``."""
    funcs = {}
    for st in stages:
        sym = stage_symbol(algorithm, st)
        funcs[sym] = st.func.with_attr("global_symbol", sym)
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


class CompiledLayer:
    """One conv layer compiled with one algorithm.

    ``layer(x)`` runs it on an N x C x H x W float32 array and returns N x M x Oh x Ow.
    Constants (re-laid-out weights) are uploaded once; intermediate buffers are
    allocated once at their worst-case size and reused. With an RPC ``session`` the
    library is exported, uploaded and run on the remote CPU instead.
    """

    def __init__(self, algorithm: str | Algorithm, spec: Conv2DSpec, weight: np.ndarray,
                 bias: np.ndarray | None = None, relu: bool = False, target=None,
                 knobs: Mapping | None = None, database=None, session=None):
        self.algorithm = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
        self.spec = spec
        self.algorithm.check(spec)
        weight = np.asarray(weight, np.float32)
        if weight.shape != spec.w_shape:
            raise ConvSpecError(f"weight shape {weight.shape} does not match the layer's {spec.w_shape}")
        self.epilogue = Epilogue(bias=bias is not None, relu=bool(relu))
        self.knobs = self.algorithm.knobs(spec, knobs)
        self.target = make_target(target)
        self.stages = self.algorithm.stages(spec, self.epilogue, self.knobs)
        mod = stage_module(self.algorithm, self.stages)
        if database is not None:
            from .tune.metaschedule import apply_database
            mod = apply_database(mod, self.stages, self.algorithm, database, self.target)
        self.executable = tvm.compile(mod, target=self.target)
        if session is None:
            self.lib, self.dev = self.executable.mod, tvm.cpu(0)
        else:
            self.lib, self.dev = _upload(self.executable, session), session.cpu(0)
        consts = self.algorithm.constants(spec, weight, bias, self.knobs)
        self.buffers: dict[str, tvm.runtime.Tensor] = {
            k: tvm.runtime.tensor(np.ascontiguousarray(v), self.dev) for k, v in consts.items()}
        for st in self.stages:
            for b in st.outputs:
                self.buffers[b.name] = tvm.runtime.empty(b.shape, b.dtype, self.dev)
        self.buffers["x"] = tvm.runtime.empty(spec.x_shape, "float32", self.dev)

    def _args(self, st: Stage):
        return [self.buffers[n] for n in st.inputs] + [self.buffers[b.name] for b in st.outputs]

    def set_input(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.shape != self.spec.x_shape:
            raise ConvSpecError(f"input shape {x.shape} does not match the layer's {self.spec.x_shape}")
        self.buffers["x"].copyfrom(np.ascontiguousarray(x, dtype=np.float32))

    def run(self) -> None:
        for st in self.stages:
            self.lib[stage_symbol(self.algorithm, st)](*self._args(st))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.set_input(x)
        self.run()
        return self.buffers["y"].numpy()

    def produced(self) -> dict[str, np.ndarray]:
        """Every stage output of the last run, as NumPy arrays."""
        return {b.name: self.buffers[b.name].numpy() for st in self.stages for b in st.outputs}

    def storage(self) -> Storage:
        """Stored elements/bytes of the representation the compiled stages built on the last run."""
        return self.algorithm.storage(self.spec, self.knobs, self.produced())

    def time(self, x: np.ndarray | None = None, repeat: int = 7, min_repeat_ms: float = 40,
             cold: bool = False) -> Timing:
        """Median time per stage with time_evaluator (first call discarded), in ms.

        Warm (default): each repeat runs a stage back to back for at least ``min_repeat_ms``, so
        the weights sit in L1/L2 as when the layer is timed alone. ``cold``: before each single
        run every argument but the first (the weights and outputs; x or the pointers stay) is
        flushed from the caches, as MetaSchedule's enable_cpu_cache_flush does; closer to a layer
        inside a model, whose weights the other layers have evicted. Cold takes 4x the repeats."""
        if x is not None:
            self.set_input(x)
        per = {}
        enc = mul = 0.0
        for st in self.stages:
            timing = ({"repeat": 4 * repeat, "f_preproc": "cache_flush_cpu_non_first_arg"} if cold
                      else {"repeat": repeat, "min_repeat_ms": min_repeat_ms})
            fe = self.lib.time_evaluator(stage_symbol(self.algorithm, st), self.dev, number=1, **timing)
            ms = float(np.median(fe(*self._args(st)).results)) * 1e3
            per[st.name] = ms
            if st.kind == "encode":
                enc += ms
            else:
                mul += ms
        # leave the buffers holding the result of this input
        self.run()
        return Timing(enc, mul, per)


def _upload(executable, session):
    """Export to a temporary .so, upload it through the RPC session and load it there.

    Each upload gets its own name: overwriting a library the server has loaded crashes it.
    """
    import os
    import tempfile
    import uuid

    name = f"layer-{uuid.uuid4().hex[:12]}.so"
    with tempfile.TemporaryDirectory(prefix="tvms-rpc-") as d:
        path = os.path.join(d, name)
        executable.export_library(path)
        session.upload(path)
    return session.load_module(name)
