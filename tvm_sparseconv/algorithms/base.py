"""What every algorithm provides: its stages as TIR PrimFuncs, build-time constants, storage.

An algorithm computes one layer as a short pipeline of destination-passing PrimFuncs
(``Stage``), e.g. ``encode`` then ``multiply``. Buffers are named: ``x`` is the activation,
the names returned by :meth:`Algorithm.constants` are re-laid-out weights (made once, at
build time), every stage output is a new named buffer, and the last stage writes ``y``
(N x M x Oh x Ow). x, y and a residual are NCHW, or channel blocks where
:meth:`Algorithm.layouts` says so (layout.py). All shapes are static: data-dependent buffers
are allocated for the worst case (every element non-zero), so the same pipeline runs
as plain ``call_tir`` bindings inside a Relax module and an exported library.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np
import tvm
from tvm.script import tirx as T

from ..cache import cached_funcs
from ..conv import HARD_SIGMOID, Conv2DSpec, Epilogue
from ..cpu import CPU, cpu_of
from ..layout import NCHW, LayoutError, channel_block
from ..reference.storage import Storage
from ..tir_math import lanes_of, sigmoid_of, splat


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Stage:
    """One PrimFunc of a pipeline. Its parameters are ``inputs`` (by name) then ``outputs``."""

    name: str
    kind: str  # "encode" (lowering or encoding the activation) or "multiply"
    func: tvm.tirx.PrimFunc
    inputs: tuple[str, ...]
    outputs: tuple[Buffer, ...]
    tunable: bool = False  # static loops from TE: MetaSchedule may schedule it


class KnobError(ValueError):
    """An unknown knob or a knob value the algorithm cannot use."""


class Algorithm:
    """Base class; subclasses are stateless singletons that join the registry with ``@register``.

    The class attributes are the algorithm's properties, which the tuner, ``layer``, the docs
    table and the tests read from the registry instead of keeping lists of names:
    ``sparse`` (it encodes the activation and skips its zeros), ``metaschedule`` (its stages
    are TE with static loops: MetaSchedule tunes them, it has no knobs), ``fuses_residual``
    (its last stage can add a residual input, Epilogue.residual, named ``res``; it writes each
    element of ``y`` once, in the statement that reads that element of ``res``, so that a model
    may pass res's buffer as y: passes/residual_in_place.py), ``groups`` (it computes
    grouped and depthwise convs; every algorithm takes any stride, dilation and padding),
    ``kernel_knob`` (the knob that chooses among its kernels, whose other defaults differ per
    kernel; None when it has one kernel). :meth:`check` says whether it takes a layer; its knob
    space is :meth:`knob_grid`, beside its kernel; :meth:`layouts` the layouts its knobs ask for.
    """

    name: str = ""
    sparse: bool = False
    metaschedule: bool = False
    fuses_residual: bool = False
    groups: bool = False
    kernel_knob: str | None = None
    knob_defaults: Mapping[str, object] = {}

    # -- what the layer may be ------------------------------------------------------------
    def check(self, spec: Conv2DSpec) -> None:
        """Raise UnsupportedConvError naming the attribute this algorithm cannot compute."""
        spec.require(self.name, groups=self.groups)

    def knobs(self, spec: Conv2DSpec, knobs: Mapping | None = None, cpu=None) -> dict:
        """Defaults for ``cpu`` (a CPU or a target; None: this machine) merged with ``knobs``;
        unknown names are refused."""
        out = dict(self.default_knobs(spec, cpu_of(cpu)))
        for k, v in (knobs or {}).items():
            if k not in out:
                raise KnobError(f"{self.name} has no knob {k!r} (knobs: {sorted(out)})")
            out[k] = v
        return out

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        return dict(self.knob_defaults)

    # -- the knob space the tuner searches --------------------------------------------------
    def knob_grid(self, spec: Conv2DSpec, cpu: CPU) -> Iterable[dict]:
        """Candidate knob dicts (possibly partial or invalid: knob_space completes, validates
        and orders them). None by default: the defaults are the only candidate."""
        return ()

    def knob_space(self, spec: Conv2DSpec, cpu=None) -> list[dict]:
        """Valid, complete knob dicts for ``spec`` on ``cpu`` (a CPU or a target; None: this
        machine): the defaults first, then the rest of knob_grid in a fixed shuffled order, so
        that any prefix (what a small budget measures) spreads over every axis of the grid
        rather than varying only its last one. A candidate that :meth:`knobs` or
        :meth:`constants` refuses is dropped, never measured."""
        cpu = cpu_of(cpu)
        return spread(self.valid_knobs(spec, cpu, [{}] + list(self.knob_grid(spec, cpu))))

    def valid_knobs(self, spec: Conv2DSpec, cpu: CPU, candidates: Iterable[Mapping]) -> list[dict]:
        """The complete knob dicts of ``candidates`` that :meth:`knobs` and :meth:`constants`
        take, each once, in order."""
        zeros = np.zeros(spec.w_shape, np.float32)
        seen, out = set(), []
        for k in candidates:
            try:
                full = self.knobs(spec, k, cpu)
                self.constants(spec, zeros, None, full)  # validates tile sizes cheaply
            except (ValueError, KeyError):
                continue
            key = tuple(sorted(full.items()))
            if key not in seen:
                seen.add(key)
                out.append(full)
        return out

    # -- the compiled pipeline -------------------------------------------------------------
    def layouts(self, spec: Conv2DSpec, knobs: Mapping) -> tuple[str, str]:
        """(the layout of ``x``, the layout of ``y`` and ``res``) of the stages built with the
        complete ``knobs`` (layout.py: "nchw" or "nchw{cb}c"): its knobs ``layout_in`` and
        ``layout_out``, NCHW for an algorithm without them."""
        return knobs.get("layout_in", NCHW), knobs.get("layout_out", NCHW)

    def constants(self, spec: Conv2DSpec, weight: np.ndarray, bias: np.ndarray | None,
                  knobs: Mapping) -> dict[str, np.ndarray]:
        """Build-time re-layout of the OIHW weight (and bias) into the arrays the stages read."""
        raise NotImplementedError

    def stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs: Mapping, cpu=None) -> list[Stage]:
        """The pipeline for ``cpu`` (a CPU or a target; None: this machine), built once per
        process for each (spec, epilogue, knobs, CPU): the stages are TVMScript, whose parsing
        is most of a model's compile time (a ResNet-50 repeats 53 layers' 21 workloads, and
        refine compiles the model six times over with mostly the same kernels)."""
        cpu = cpu_of(cpu)
        try:
            key = (self.name, spec, epilogue, tuple(sorted(knobs.items())), cpu)
            hash(key)
        except TypeError:  # a knob value that is not hashable: built afresh
            return self.build_stages(spec, epilogue, knobs, cpu)
        return list(_built_stages(self, key))

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs: Mapping, cpu: CPU) -> list[Stage]:
        """What :meth:`stages` returns, built (the subclass's work). It must depend on its
        arguments and the source alone: what it returns is kept in the kernel cache."""
        raise NotImplementedError

    # -- memory accounting ---------------------------------------------------------------
    def storage(self, spec: Conv2DSpec, knobs: Mapping, produced: Mapping[str, np.ndarray]) -> Storage:
        """Stored elements/bytes of the representation, read from what the compiled stages produced."""
        raise NotImplementedError

    def reference_storage(self, spec: Conv2DSpec, knobs: Mapping, x: np.ndarray) -> Storage:
        """The same count from the NumPy reference encoder (must agree with :meth:`storage`)."""
        raise NotImplementedError

    def reference(self, spec: Conv2DSpec, knobs: Mapping, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The output computed by the NumPy reference of this algorithm's format."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<algorithm {self.name}>"


@functools.lru_cache(maxsize=None)
def _module_digest(cls: type) -> str:
    """sha1 of the file that defines ``cls``: the cache's version covers the package's own
    source, and this an algorithm registered from outside it."""
    try:
        with open(inspect.getsourcefile(cls), "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()
    except (TypeError, OSError):  # no file (a class made at run time): its kernels stay in this process
        return f"unsourced {os.getpid()} {id(cls)}"


@functools.lru_cache(maxsize=1024)
def _built_stages(algo: Algorithm, key: tuple) -> tuple[Stage, ...]:
    """Algorithm.stages' cache in this process, over the kernel cache on disk (cache.py): ``key``
    is (name, spec, epilogue, sorted knob items, CPU). A PrimFunc is immutable, so the same
    Stage objects serve every caller."""
    name, spec, epilogue, knobs, cpu = key

    def build():
        st = algo.build_stages(spec, epilogue, dict(knobs), cpu)
        return [s.func for s in st], [[s.name, s.kind, list(s.inputs), [[b.name, list(b.shape), b.dtype]
                                                                       for b in s.outputs], s.tunable] for s in st]

    text = json.dumps([name, _module_digest(type(algo)), asdict(spec), asdict(epilogue), knobs, asdict(cpu)],
                      sort_keys=True)
    funcs, meta = cached_funcs(text, build)
    return tuple(Stage(n, kind, f, tuple(ins), tuple(Buffer(b, tuple(shape), dt) for b, shape, dt in outs), tunable)
                 for f, (n, kind, ins, outs, tunable) in zip(funcs, meta))


REGISTRY: dict[str, Algorithm] = {}


def register(cls):
    """Class decorator: one instance of ``cls`` joins the registry under ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"algorithm name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls()
    return cls


def spread(knobs: list[dict], keep_first: bool = True) -> list[dict]:
    """``knobs`` in a fixed shuffled order (the first one kept first when ``keep_first``), so
    that a prefix spreads over every axis of a grid (Algorithm.knob_space)."""
    head, rest = (knobs[:1], knobs[1:]) if keep_first else ([], list(knobs))
    random.Random(0).shuffle(rest)
    return head + rest


def grid(**axes) -> Iterable[dict]:
    """Every combination of the knob values in ``axes`` (name -> values), as dicts."""
    keys = list(axes)
    for vals in itertools.product(*(axes[k] for k in keys)):
        yield dict(zip(keys, vals))


def balanced(most: int, size: int) -> int:
    """The smallest tile that cuts ``size`` into as many tiles as tiles of ``most`` do (size 14,
    most 8: 7, not 8 with 2 wasted)."""
    return -(-size // -(-size // most))


def registers_ok(cpu: CPU, pixels: int, m_tile: int) -> bool:
    """A register tile of ``pixels`` x ``m_tile`` accumulators fits the knob spaces' band: more
    than 3/4 of the CPU's vector registers spills (24 on AVX-512, 12 on AVX2) and fewer than
    ~4 starves the FMA units."""
    return 4 <= pixels * m_tile / cpu.lanes <= cpu.registers * 3 // 4


def epilogue_value(v, m, bias_buf, epilogue: Epilogue, res_buf=None, at=()):
    """TIR expression: accumulator ``v`` of output channel ``m`` after bias, the residual
    ``res_buf[at]`` (``at``: the output element's indices), ReLU and the clip, or the gate
    (conv.Epilogue).
    ``v`` may be a vector of pixels of one channel (``at`` then ends in a Ramp).

    The bounds are select(v < 0, 0, v) and select(v > a, a, v) so that NaN propagates (max()
    and min() would drop it).
    """
    lanes = lanes_of(v)

    def const(a):  # a float32 constant as wide as v
        return splat(float(a), lanes)

    if epilogue.bias:
        v = v + bias_buf[m]
    if epilogue.residual:
        v = v + res_buf[at]
    if epilogue.relu:
        v = tvm.tirx.Select(v < const(0.0), const(0.0) if epilogue.slope is None else v * const(epilogue.slope), v)
    if epilogue.clip is not None:
        a = const(epilogue.clip)
        v = tvm.tirx.Select(v > a, a, v)
    if epilogue.gate == "hard_sigmoid":  # the graph's ops in its order: clip(v * a + b, 0, 1) * v
        g = v * const(HARD_SIGMOID[0]) + const(HARD_SIGMOID[1])
        v = v * tvm.tirx.max(tvm.tirx.min(g, const(1.0)), const(0.0))
    elif epilogue.gate == "sigmoid":
        v = v * sigmoid_of(v)
    return v


def blocked_value(v, m, bias_buf, epilogue: Epilogue, res_buf, at, M: int, pad: bool):
    """Accumulator v of channel m of a blocked y through the epilogue (epilogue_value); 0 for
    the channels past M of the last block when there are some (``pad``): the layout's promise
    (layout.py). The bias is padded to whole blocks, so that reading it there stays in bounds."""
    v = epilogue_value(v, m, bias_buf, epilogue, res_buf, at)
    return tvm.tirx.Select(m < M, v, tvm.tirx.const(0.0, "float32")) if pad else v


def knob_blocks(algorithm: str, knobs: Mapping) -> tuple[int, int]:
    """The channel blocks of the knobs ``layout_in`` and ``layout_out`` (layout.channel_block: 0
    for NCHW); a KnobError naming the algorithm and the knob for anything else."""
    def block(knob):
        try:
            return channel_block(knobs[knob])
        except LayoutError as e:
            raise KnobError(f"{algorithm}: {knob}: {e}") from None
    return block("layout_in"), block("layout_out")


@T.macro
def store_output(y, at, v, bias, res, ep):
    """y[at] = epilogue_value(v) for output element at = (n, m, ...): bias[m], res[at], ReLU."""
    y[at] = epilogue_value(v, at[1], bias, ep, res, at)


def epilogue_inputs(epilogue: Epilogue) -> tuple[str, ...]:
    """The last stage's inputs after its own: "bias", then "res" (y-shaped), when used."""
    return ("bias",) * epilogue.bias + ("res",) * epilogue.residual


def drop_unused(func: tvm.tirx.PrimFunc, epilogue: Epilogue) -> tvm.tirx.PrimFunc:
    """A stage written with every epilogue input as a parameter (bias, res), without those
    ``epilogue`` does not use (its body never reads them): one signature, not one per case."""
    unused = {name for name, used in (("bias", epilogue.bias), ("res", epilogue.residual)) if not used}
    keep = [p for p in func.params if p.name not in unused]
    return tvm.tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs)


def bias_constant(spec: Conv2DSpec, bias: np.ndarray | None, length: int = 0) -> dict[str, np.ndarray]:
    """The ``bias`` constant when there is one: M float32, padded with zeros to ``length`` when
    it is longer (a kernel writing whole channel blocks reads bias 0 past M)."""
    if bias is None:
        return {}
    bias = np.asarray(bias, np.float32).reshape(-1)
    if bias.shape != (spec.out_channels,):
        raise ValueError(f"bias must have {spec.out_channels} values, got shape {bias.shape}")
    return {"bias": np.pad(bias, (0, max(0, length - spec.out_channels)))}


def nonzero(v):
    """TIR: float32 v is a non-zero (NaN and Inf are, -0.0 is not).

    Tested on the bits: a float ``v != 0`` is an ordered compare in TIR, false for NaN.
    """
    return tvm.tirx.reinterpret("int32", v) & 0x7FFFFFFF != 0


def any_nonzero(v, length: int):
    """TIR: some v[k], k < length, is a non-zero (one OR of the bits, then one test)."""
    bits = tvm.tirx.reinterpret("int32", v[0])
    for k in range(1, length):
        bits = bits | tvm.tirx.reinterpret("int32", v[k])
    return bits & 0x7FFFFFFF != 0


def is_read(spec: Conv2DSpec, axis: int, i):
    """TIR: real input row (axis 0) or column (axis 1) i is read by some output pixel
    (True when every one is, as reference.dense.read_mask says)."""
    from ..reference.dense import read_mask

    size, kernel, out = (spec.height, spec.kernel_h, spec.out_h) if axis == 0 else \
        (spec.width, spec.kernel_w, spec.out_w)
    pad, stride, dilation = spec.padding[axis], spec.stride[axis], spec.dilation[axis]
    if read_mask(size, pad, stride, dilation, kernel, out).all():
        return True
    conds = []
    for k in range(kernel):
        o = i + pad - k * dilation  # = output index * stride when tap k of that output reads i
        conds.append(tvm.tirx.all(o >= 0, tvm.tirx.floormod(o, stride) == 0,
                                  tvm.tirx.floordiv(o, stride) < out))
    return tvm.tirx.any(*conds)


# a kernel with this attribute keeps its scratch buffers where TVM puts them (a workspace
# allocation per parallel task) instead of on the stack (passes/stack_scratch.py): set where
# the stack measured slower
SCRATCH_IN_WORKSPACE = "tvm_sparseconv.scratch_in_workspace"


def prim(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A hand-scheduled stage as every stage needs it: noalias, its body in a block.

    The body goes into an opaque block annotated with the schedule rule of stages.py
    (MetaSchedule then keeps the kernel as written), inside a root block: Relax's
    RewriteDataflowReshape asks every call_tir with one argument (an encoder of x) whether
    it is a reshape, and that analysis fails on a body that is not a block.
    """
    from tvm import s_tir

    from ..stages import RULE

    kernel = s_tir.SBlock([], [], [], "tvms_kernel", func.body, annotations={"schedule_rule": RULE})
    root = s_tir.SBlock([], [], [], "root", s_tir.SBlockRealize([], True, kernel))
    return func.with_body(s_tir.SBlockRealize([], True, root)).with_attr("tirx.noalias", True)
