"""Fuzzing the kernels: random small conv layers through every algorithm, against the float64
reference. ``tvm-sparseconv fuzz`` runs a campaign; docs/fuzz.md says what it generates and checks.

A campaign is a seed S and a number of layers. Layer k is made from its own seed, derived from
(S, k) alone (:func:`layer_seed`), so ``--only k`` re-runs it without the layers before it, and
its knob dicts are drawn from that seed and the algorithm's name, so running one algorithm
alone picks the same knobs as the full run (on the same target).

For each layer, every algorithm whose ``check`` accepts it runs with ``knob_dicts`` dicts of
its knob space (``Algorithm.knob_space`` for the target; the defaults in half the draws), with
the layer's epilogue (bias, ReLU, and the residual where the algorithm fuses one), each
candidate built and run in a worker process (worker.py) so that an LLVM abort, a segfault or a
hang is an error for that candidate and the campaign goes on. Its output is compared with
``reference.dense_conv2d`` (float64) within ``measure.tolerance``, NaN where the reference has
NaN and the same Inf where it has Inf (``measure.max_abs_error``). Outcomes:

- ok, wrong (the error is over the tolerance, or NaN/Inf are elsewhere), error (the build or run
  raised, the worker died or timed out, or the bounds check found an out-of-bounds access);
- refused: a sampled knob dict that the algorithm refuses (KnobError, UnsupportedConvError).
  The defaults are never refused for a layer ``check`` accepts: that is an error.

The bounds check (:class:`Redzones`) does not use TVM's ``tirx.instrument_bound_checkers``:
in TVM 0.27 that pass instruments nothing (docs/fuzz.md has the details).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, asdict

import numpy as np

from . import interrupt
from .algorithms import ALGORITHMS, KnobError, get_algorithm, knob_space, supports
from .conv import Conv2DSpec, ConvSpecError, UnsupportedConvError
from .layer import synthesize_activation, synthesize_weight
from .measure import Progress, max_abs_error, tolerance
from .reference import dense_conv2d
from .reference.layout import from_layout
from .worker import Cached, CandidateCrash, Worker, isolated

# the generator's ranges (docs/fuzz.md)
MAX_BATCH = 3
MAX_CHANNELS = 40
MAX_SIZE = 24
MAX_KERNEL = 5
STRIDES = (1, 1, 2, 3)        # 1 twice: half the axes unstrided
DILATIONS = (1, 1, 1, 2)
PADDINGS = ("none", "symmetric", "same", "asymmetric", "beyond")
SPECIALS = ("nan", "inf", "-inf", "-0.0")
SPECIAL_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "-0.0": -0.0}

# what a set of generated layers must cover (layer_features names; tests/test_fuzz.py checks it)
FEATURES = ("batch>1", "non-square input", "1-pixel input side", "rectangular kernel", "1x1 kernel",
            "5-tap kernel side", "stride>1", "unequal strides", "dilation>1", "asymmetric padding",
            "same padding", "padding beyond the kernel", "grouped", "depthwise", "density 0", "density 1",
            "uniform zeros", "clustered zeros", "negative values", "all-zero channel", "all-zero row",
            "nan", "inf", "-inf", "-0.0", "nan in a zero channel", "bias", "relu", "residual")


def layer_seed(campaign_seed: int, index: int) -> int:
    """The seed of layer ``index`` of campaign ``campaign_seed`` (a function of the two alone)."""
    return int(np.random.SeedSequence([int(campaign_seed), int(index)]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class FuzzLayer:
    """One generated layer: the conv, the recipe of its activation, its epilogue.

    :meth:`arrays` makes the activation (N x C x H x W), weight (OIHW), bias (M) and residual
    (N x M x Oh x Ow) from ``seed``, the same arrays every time."""

    index: int
    seed: int
    spec: Conv2DSpec
    padding_kind: str          # one of PADDINGS: how the padding was drawn
    density: float             # share of non-zeros before channels and rows are zeroed
    zeros: str                 # "uniform" (independent) or "clustered" (a thresholded smooth field)
    signed: bool               # values of both signs (else ReLU-like, positive)
    zero_channels: float       # share of channels set to zero in every image
    zero_rows: float           # share of (image, input row) pairs set to zero in every channel
    specials: tuple[str, ...]  # of SPECIALS: put into the activation (and NaN/Inf into the residual)
    bias: bool
    relu: bool
    residual: bool

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(x, w, bias or None, residual or None), float32."""
        spec = self.spec
        rng = np.random.default_rng([self.seed, 1])
        shape = spec.x_shape
        if self.zeros == "clustered":
            x = synthesize_activation(shape, self.density, int(rng.integers(2 ** 31)), zero_channels=0.0)
        else:
            x = np.where(rng.random(shape) < self.density, np.abs(rng.standard_normal(shape)) + 0.05, 0.0)
        if self.signed:
            x = x * rng.choice(np.array([-1.0, 1.0]), size=shape)
        x = x.astype(np.float32)
        dead = np.flatnonzero(rng.random(spec.in_channels) < self.zero_channels)
        x[:, dead] = 0
        rows = rng.random((spec.batch, spec.height)) < self.zero_rows
        x[np.broadcast_to(rows[:, None, :, None], shape)] = 0
        for s in self.specials:
            if s == "-0.0":  # a share of the zeros become -0.0 (at density 1: some values do)
                zero = np.flatnonzero(x.reshape(-1) == 0)
                pick = zero[rng.random(zero.size) < rng.uniform(0.2, 1.0)] if zero.size else \
                    rng.integers(0, x.size, int(rng.integers(1, 4)))
                x.reshape(-1)[pick] = -0.0
            else:
                x.reshape(-1)[rng.integers(0, x.size, int(rng.integers(1, 4)))] = SPECIAL_VALUES[s]
        if "nan" in self.specials and dead.size and rng.random() < 0.5:  # a NaN alone in a zero channel
            x[int(rng.integers(spec.batch)), int(rng.choice(dead)), int(rng.integers(spec.height)),
              int(rng.integers(spec.width))] = np.nan
        w = synthesize_weight(spec, int(rng.integers(2 ** 31)))
        bias = (0.5 * rng.standard_normal(spec.out_channels)).astype(np.float32) if self.bias else None
        res = None
        if self.residual:
            res = rng.standard_normal(spec.y_shape).astype(np.float32)
            for s in set(self.specials) & {"nan", "inf", "-inf"}:
                res.reshape(-1)[int(rng.integers(res.size))] = SPECIAL_VALUES[s]
        return x, w, bias, res

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    def describe(self) -> str:
        """One line: shapes, attributes, input recipe, epilogue."""
        s = self.spec
        ep = "+".join(k for k in ("bias", "residual", "relu") if getattr(self, k)) or "plain"
        return (f"{s.batch}x{s.in_channels}x{s.height}x{s.width} -> {s.out_channels}, k{s.kernel_h}x{s.kernel_w} "
                f"s{s.stride[0]},{s.stride[1]} d{s.dilation[0]},{s.dilation[1]} p{','.join(map(str, s.padding))} "
                f"g{s.groups}, density {self.density:.2f} {self.zeros}{' signed' if self.signed else ''}"
                f"{' ' + ','.join(self.specials) if self.specials else ''}, {ep}")


def _sample_spec(rng: np.random.Generator) -> tuple[Conv2DSpec, str]:
    """A random layer within the generator's ranges and how its padding was drawn; draws again
    until the kernel fits the padded input."""
    for _ in range(10000):
        n = int(rng.integers(1, MAX_BATCH + 1)) if rng.random() < 0.4 else 1
        c, m = (int(v) for v in rng.integers(1, MAX_CHANNELS + 1, 2))
        g = 1
        if rng.random() < 0.15:  # grouped: depthwise (with a channel multiplier) or a few groups
            if rng.random() < 0.5:
                g, m = c, c * int(rng.choice([1, 1, 2]))
                m = m if m <= MAX_CHANNELS else c
            else:
                g = int(rng.integers(2, 9))
                c = g * int(rng.integers(1, MAX_CHANNELS // g + 1))
                m = g * int(rng.integers(1, MAX_CHANNELS // g + 1))
        h, w = (int(v) for v in rng.integers(1, MAX_SIZE + 1, 2))
        kh = int(rng.integers(1, MAX_KERNEL + 1))
        kw = kh if rng.random() < 0.4 else int(rng.integers(1, MAX_KERNEL + 1))
        sh = int(rng.choice(STRIDES))
        sw = sh if rng.random() < 0.5 else int(rng.choice(STRIDES))
        dh = int(rng.choice(DILATIONS))
        dw = dh if rng.random() < 0.5 else int(rng.choice(DILATIONS))
        kind = str(rng.choice(PADDINGS))
        if rng.random() < 0.15:  # pointwise, as in CNNs (and dense's gemm kernel): 1x1, mostly unpadded
            kh = kw = dh = dw = 1
            kind = "none" if rng.random() < 0.7 else kind
        pads = [_padding(rng, kind, size, (k - 1) * d + 1, s)
                for size, k, d, s in ((h, kh, dh, sh), (w, kw, dw, sw))]
        (pt, pb), (pl, pr) = pads
        try:
            return Conv2DSpec.from_shapes((n, c, h, w), (m, c // g, kh, kw), (sh, sw), (pt, pl, pb, pr),
                                          (dh, dw), g), kind
        except ConvSpecError:  # the kernel does not fit: draw again
            continue
    raise RuntimeError("no layer drawn in 10000 tries")  # cannot happen with these ranges


def _padding(rng: np.random.Generator, kind: str, size: int, eff: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one axis: ``eff`` is the dilated kernel extent."""
    if kind == "none":
        return 0, 0
    if kind == "symmetric":
        p = int(rng.integers(0, eff // 2 + 1))
        return p, p
    if kind == "same":  # TensorFlow's SAME: Oh = ceil(H / S), the odd pixel of padding after
        total = max((math.ceil(size / stride) - 1) * stride + eff - size, 0)
        return total // 2, total - total // 2
    if kind == "asymmetric":
        return tuple(int(v) for v in rng.integers(0, eff + 1, 2))
    # beyond: one side at least the whole kernel extent (outputs that read only padding)
    big = int(rng.integers(eff, eff + 3))
    other = int(rng.integers(0, eff + 3))
    return (big, other) if rng.random() < 0.5 else (other, big)


def generate_layer(campaign_seed: int, index: int) -> FuzzLayer:
    """Layer ``index`` of campaign ``campaign_seed``."""
    seed = layer_seed(campaign_seed, index)
    rng = np.random.default_rng(seed)
    spec, padding_kind = _sample_spec(rng)
    u = rng.random()
    density = 0.0 if u < 0.08 else 1.0 if u < 0.16 else float(rng.random())
    specials = tuple(s for s in SPECIALS if rng.random() < 0.5) if rng.random() < 0.3 else ()
    return FuzzLayer(
        index=index, seed=seed, spec=spec, padding_kind=padding_kind, density=density,
        zeros=str(rng.choice(["uniform", "clustered"])), signed=bool(rng.random() < 0.3),
        zero_channels=float(rng.uniform(0.1, 0.5)) if rng.random() < 0.3 else 0.0,
        zero_rows=float(rng.uniform(0.1, 0.5)) if rng.random() < 0.25 else 0.0,
        specials=specials, bias=bool(rng.random() < 0.5), relu=bool(rng.random() < 0.5),
        residual=bool(rng.random() < 0.35))


def layer_features(layer: FuzzLayer, x: np.ndarray) -> set[str]:
    """The FEATURES ``layer`` (with its activation ``x``) has, read from the spec and the array."""
    s = layer.spec
    pt, pl, pb, pr = s.padding
    eff_h, eff_w = (s.kernel_h - 1) * s.dilation[0] + 1, (s.kernel_w - 1) * s.dilation[1] + 1
    nz = x != 0  # the encoders' non-zero test: NaN is one, -0.0 is not
    live = nz.any()
    chan_zero = ~nz.any(axis=(2, 3))
    row_zero = ~nz.any(axis=(1, 3))
    zero_chan_nan = any(np.isnan(x[n, c]).sum() == np.count_nonzero(x[n, c]) == 1
                        for n, c in np.argwhere(np.isnan(x).any(axis=(2, 3))))
    has = {
        "batch>1": s.batch > 1, "non-square input": s.height != s.width,
        "1-pixel input side": min(s.height, s.width) == 1,
        "rectangular kernel": s.kernel_h != s.kernel_w, "1x1 kernel": s.kernel_h == s.kernel_w == 1,
        "5-tap kernel side": max(s.kernel_h, s.kernel_w) == MAX_KERNEL, "stride>1": max(s.stride) > 1,
        "unequal strides": s.stride[0] != s.stride[1], "dilation>1": max(s.dilation) > 1,
        "asymmetric padding": pt != pb or pl != pr,
        "same padding": layer.padding_kind == "same" and max(s.padding) > 0,
        "padding beyond the kernel": max(pt, pb) >= eff_h or max(pl, pr) >= eff_w,
        "grouped": 1 < s.groups < s.in_channels, "depthwise": s.groups == s.in_channels > 1,
        "density 0": not live, "density 1": bool(nz.all()),
        "uniform zeros": layer.zeros == "uniform" and 0 < layer.density < 1,
        "clustered zeros": layer.zeros == "clustered" and 0 < layer.density < 1,
        "negative values": bool((x < 0).any()),
        "all-zero channel": live and bool(chan_zero.any()), "all-zero row": live and bool(row_zero.any()),
        "nan": bool(np.isnan(x).any()), "inf": bool(np.isposinf(x).any()), "-inf": bool(np.isneginf(x).any()),
        "-0.0": bool(((x == 0) & np.signbit(x)).any()), "nan in a zero channel": zero_chan_nan,
        "bias": layer.bias, "relu": layer.relu, "residual": layer.residual,
    }
    return {k for k, v in has.items() if v}


# -- candidates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One algorithm with one knob dict on one layer; ``sampled``: drawn from the knob space
    (False: the defaults); ``residual``: the layer's residual is fused (only an algorithm that
    fuses_residual takes it, the others run the layer's epilogue without it)."""

    algorithm: str
    knobs: dict
    sampled: bool
    residual: bool


def candidates(layer: FuzzLayer, algorithms=ALGORITHMS, target=None, knob_dicts: int = 1) -> list[Candidate]:
    """Every algorithm of ``algorithms`` that accepts the layer, with ``knob_dicts`` dicts of its
    knob space for ``target`` (all of them when it has fewer): the defaults in half the draws,
    the others uniformly, drawn from the layer's seed and the algorithm's name. An algorithm
    without knobs runs once, with its defaults.

    One dict per algorithm and layer is the default: a build costs 0.1-4 s and a campaign wants
    many layers, so the defaults and the rest of the space take turns across the layers."""
    out = []
    for name in algorithms:
        if not supports(name, layer.spec):
            continue
        algo = get_algorithm(name)
        space = knob_space(name, layer.spec, target)
        rng = np.random.default_rng([layer.seed, 2, zlib.crc32(name.encode())])
        k = min(max(int(knob_dicts), 1), len(space))
        with_defaults = k == len(space) or bool(rng.random() < 0.5)
        others = rng.choice(np.arange(1, len(space)), k - with_defaults, replace=False) if k > with_defaults else []
        picks = [0] * with_defaults + sorted(int(i) for i in others)
        residual = layer.residual and algo.fuses_residual
        out += [Candidate(name, space[i], i != 0, residual) for i in picks]
    return out


# -- one candidate, in the worker ---------------------------------------------------------------

class Redzones:
    """The bounds check: every buffer of a CompiledLayer (activation, weights, intermediates,
    output, residual) moved into NumPy memory between two guard zones of GUARD_BYTES, which are
    filled with a known pattern before a run and compared after it.

    A write outside a buffer (within the guard) shows as changed guard elements; a read outside it
    that reaches the output shows as an output that changes when the guards are filled with the
    other pattern (FILLS: a NaN and a finite value, so a product with 0 differs too). Reads whose
    value is dropped, and accesses past the guard, are not seen. The buffers stay 64-byte
    aligned, as the kernels assume."""

    GUARD_BYTES = 16384
    # 4-byte patterns per buffer dtype kind: a quiet NaN with a payload, then 1000.0 (float32);
    # a huge and a negative index (int32)
    FILLS = {"f": (0x7FC5A5A5, 0x447A0000), "i": (0x7FC5A5A5, 0xFFFFFFF0)}

    def __init__(self, buffers: dict):
        import tvm

        self.zones = {}  # name -> (whole uint8 array: guard, data, guard; dtype kind)
        g = self.GUARD_BYTES
        for name, t in list(buffers.items()):
            dtype = np.dtype(str(t.dtype))
            shape = tuple(int(v) for v in t.shape)
            nbytes = math.prod(shape) * dtype.itemsize
            raw = np.empty(nbytes + 2 * g + 64, np.uint8)
            off = -raw.ctypes.data % 64
            whole = raw[off:off + nbytes + 2 * g]
            body = whole[g:g + nbytes].view(dtype).reshape(shape)
            body[...] = t.numpy()
            buffers[name] = tvm.runtime.from_dlpack(body)
            self.zones[name] = (whole, dtype.kind)

    def fill(self, which: int) -> None:
        """Both guards of every buffer with pattern ``which`` (0 or 1) of its dtype kind."""
        g = self.GUARD_BYTES
        for whole, kind in self.zones.values():
            pat = np.full(g // 4, self.FILLS[kind][which], np.uint32).view(np.uint8)
            whole[:g] = pat
            whole[-g:] = pat

    def damage(self, which: int) -> list[str]:
        """What a run wrote into the guards filled with pattern ``which``: one line per buffer,
        in elements of the buffer's dtype (4 bytes)."""
        g, out = self.GUARD_BYTES // 4, []
        for name, (whole, kind) in self.zones.items():
            words = whole.view(np.uint32)
            size = words.size - 2 * g
            pat = np.uint32(self.FILLS[kind][which])
            before = np.flatnonzero(words[:g] != pat)
            after = np.flatnonzero(words[-g:] != pat)
            if before.size:
                out.append(f"{name}: wrote {before.size} elements before its start (from element {int(before[0]) - g})")
            if after.size:
                out.append(f"{name}: wrote {after.size} elements past its end (from element {size + int(after[0])} "
                           f"of {size})")
        return out


class OutOfBounds(RuntimeError):
    """The bounds check found an access outside a buffer (the message says which)."""


def check_candidate(algorithm: str, spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, bias, relu: bool, res,
                    knobs: dict, target: str, bounds_check: bool) -> dict:
    """Build ``algorithm`` with ``knobs`` for the layer and run it on x (and the residual
    ``res``) with every buffer it writes poisoned first: {"y": output, "build_s", "run_s"}.
    With ``bounds_check`` the buffers sit between guard zones (Redzones) and the layer runs once
    per guard pattern; an access outside a buffer raises OutOfBounds. The job the worker runs."""
    from .build import CompiledLayer

    t0 = time.perf_counter()
    layer = CompiledLayer(algorithm, spec, w, bias, relu, target, knobs, residual=res is not None)
    t1 = time.perf_counter()
    zones = Redzones(layer.buffers) if bounds_check else None
    ys = []
    for which in (0, 1) if bounds_check else (None,):
        if zones:
            zones.fill(which)
        layer.poison()
        layer.set_input(x, res)
        layer.run()
        if zones:
            bad = zones.damage(which)
            if bad:
                raise OutOfBounds("out-of-bounds write: " + "; ".join(bad))
        ys.append(layer.buffers["y"].numpy())  # as written (a blocked y with its lanes past M)
    if bounds_check:
        diff = np.argwhere(ys[0].view(np.uint32) != ys[1].view(np.uint32))
        if diff.size:
            raise OutOfBounds(f"out-of-bounds read: {len(diff)} output elements change with the bytes around the "
                              f"buffers, the first at {tuple(int(v) for v in diff[0])}")
    y = from_layout(ys[0], layer.layout_out, spec.out_channels)
    return {"y": y, "build_s": t1 - t0, "run_s": time.perf_counter() - t1}


def reference_output(layer: FuzzLayer, x, w, bias, res) -> np.ndarray:
    """What every candidate of ``layer`` must compute: dense_conv2d in float64 (res: None when
    the candidate does not fuse the residual)."""
    return dense_conv2d(layer.spec, x, w, bias, layer.relu, residual=res)


def mismatch(y: np.ndarray, ref: np.ndarray) -> str:
    """Where ``y`` departs from ``ref`` most, in words (for a wrong candidate)."""
    parts = []
    for what, a, b in (("NaN", np.isnan(y), np.isnan(ref)), ("+Inf", np.isposinf(y), np.isposinf(ref)),
                       ("-Inf", np.isneginf(y), np.isneginf(ref))):
        if (a & ~b).any():
            parts.append(f"{what} at {int((a & ~b).sum())} elements where the reference has none, the first at "
                         f"{tuple(int(v) for v in np.argwhere(a & ~b)[0])}")
        if (b & ~a).any():
            parts.append(f"no {what} at {int((b & ~a).sum())} elements where the reference has one")
    fin = np.isfinite(ref) & np.isfinite(y)
    if fin.any():
        d = np.where(fin, np.abs(y.astype(np.float64) - ref), 0)
        i = np.unravel_index(int(np.argmax(d)), d.shape)
        parts.append(f"largest finite error {d[i]:.3g} at {tuple(int(v) for v in i)} "
                     f"(got {y[i]:.6g}, want {ref[i]:.6g})")
    return "; ".join(parts)


# -- the campaign ------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One candidate's result. status: ok, wrong, error or refused."""

    layer: int
    seed: int
    algorithm: str
    knobs: dict
    sampled: bool
    status: str
    max_abs_error: float | None = None
    tolerance: float | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class CampaignResult:
    """What a campaign found: counts, every failing case (a dict that re-runs it), time by algorithm."""

    campaign_seed: int
    layers: int = 0
    wrong: int = 0
    errors: int = 0
    refusals: int = 0
    candidates: int = 0
    failures: list = field(default_factory=list)
    seconds_by_algorithm: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    interrupted: bool = False   # Ctrl-C ended it: the counts are those of the layers finished
    done: list = field(default_factory=list)  # the indices of the layers finished, in order
    params: dict = field(default_factory=dict)  # what a resumed campaign must run with too

    @classmethod
    def from_dict(cls, d: dict, where: str = "campaign") -> "CampaignResult":
        """The result ``to_dict`` wrote (fuzz --json), to resume; ValueError if it is not one."""
        try:
            keep = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            res = cls(**keep)
            if not isinstance(res.done, list) or len(res.done) != res.layers:
                raise ValueError(f"it lists {len(res.done)} layers done and counts {res.layers}")
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{where} is not the JSON of a fuzz campaign ({e})") from None
        return res

    @property
    def failed(self) -> bool:
        return bool(self.wrong or self.errors)

    def summary(self) -> str:
        """``N layers, W wrong, E errors``, then the refusals and the candidates run."""
        return (f"{self.layers} layers, {self.wrong} wrong, {self.errors} errors, {self.refusals} refusals, "
                f"{self.candidates} candidates")

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary(),
                "layers_per_minute": 60.0 * self.layers / self.elapsed_s if self.elapsed_s else None}


def _one_line(e: BaseException) -> str:
    """An exception as one line: its type and the last non-empty line of its message (TVM puts
    the error itself last, after its traceback)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[-1][:400] if lines else ''}".rstrip(": ")


def run_fuzz_layer(layer: FuzzLayer, worker: Worker, algorithms=ALGORITHMS, target: str | None = None,
                   knob_dicts: int = 1, bounds_check: bool = True, timeout: float | None = None,
                   job=check_candidate) -> list[Outcome]:
    """Every candidate of ``layer`` (candidates()) through ``job`` in ``worker``, checked against
    reference_output. A crash or hang of the worker, an exception or an out-of-bounds access is
    an error; a KnobError or UnsupportedConvError for a sampled knob dict is a refusal."""
    from .target import make_target

    target = str(make_target(target))
    x, w, bias, res = layer.arrays()
    refs = {}
    out = []
    cx, cw, cres = Cached(x), Cached(w), Cached(res)
    for cand in candidates(layer, algorithms, target, knob_dicts):
        o = Outcome(layer.index, layer.seed, cand.algorithm, cand.knobs, cand.sampled, "ok")
        if cand.residual not in refs:
            ref = reference_output(layer, x, w, bias, res if cand.residual else None)
            refs[cand.residual] = (ref, tolerance(layer.spec, ref))
        ref, tol = refs[cand.residual]
        t = time.monotonic()
        try:
            r = worker.call(job, cand.algorithm, layer.spec, cx, cw, bias, layer.relu,
                            cres if cand.residual else None, cand.knobs, target, bounds_check, timeout=timeout)
        except (KnobError, UnsupportedConvError) as e:
            o.status, o.error = ("refused" if cand.sampled else "error"), _one_line(e)
        except CandidateCrash as e:
            o.status, o.error = "error", f"CandidateCrash: {e}"
        except Exception as e:  # the build or the run raised, or OutOfBounds
            interrupt.check()
            o.status, o.error = "error", _one_line(e)
        else:
            o.max_abs_error, o.tolerance = max_abs_error(r["y"], ref), tol
            if not o.max_abs_error <= tol:
                o.status, o.error = "wrong", mismatch(r["y"], ref)
        o.seconds = time.monotonic() - t
        out.append(o)
    return out


def failure_case(layer: FuzzLayer, o: Outcome, campaign_seed: int, target: str) -> dict:
    """A failing candidate as the JSON record that re-runs it: the layer (spec and input recipe),
    the algorithm, its knobs, the seeds, the error or the max error, and the command."""
    return {"layer": layer.index, "layer_seed": layer.seed, "campaign_seed": campaign_seed,
            "status": o.status, "algorithm": o.algorithm, "knobs": o.knobs, "sampled_knobs": o.sampled,
            "max_abs_error": o.max_abs_error, "tolerance": o.tolerance, "error": o.error,
            "spec": layer.spec.to_dict(), "recipe": layer.to_dict(), "description": layer.describe(),
            "target": json.loads(target),
            "rerun": f"tvm-sparseconv fuzz --seed {campaign_seed} --only {layer.index} --algorithms {o.algorithm}"}


def run_campaign(campaign_seed: int, layers: int = 100, only=None, algorithms=ALGORITHMS, target=None,
                 knob_dicts: int = 1, bounds_check: bool = True, jobs: int = 1, timeout: float | None = 300,
                 progress: bool = True, on_failure=lambda case: None, job=check_candidate,
                 recycle: int = 100, resume: CampaignResult | None = None,
                 on_layer=lambda res: None) -> CampaignResult:
    """Layers 0 .. ``layers``-1 of campaign ``campaign_seed`` (or the indices in ``only``), each
    through run_fuzz_layer; ``on_failure`` gets each failing case (failure_case) as it is found,
    ``on_layer`` the result so far after each layer (the CLI writes it to its --json file then,
    so that a kill loses at most the layers under way).

    ``resume``: an earlier result of this campaign (CampaignResult.from_dict): its layers are not
    run again and the counts go on from it. It must have been run with the same seed,
    algorithms, knob dicts, bounds check and target (ValueError otherwise).

    ``jobs`` layers run at once, each job with its own worker process (in-process workers,
    TVMS_IN_PROCESS=1, run one at a time); results are taken in layer order. A worker is
    restarted every ``recycle`` layers, which bounds what its compiled modules leave behind.
    ``progress``: a line with ETA on stderr per layer. Ctrl-C ends the campaign early: the
    result holds the layers finished, with ``interrupted`` set."""
    from .target import make_target

    for a in algorithms:
        get_algorithm(a)  # an unknown name: ValueError before any work
    target = str(make_target(target))  # a JSON dict: what the worker jobs and the failing cases get
    params = {"campaign_seed": campaign_seed, "algorithms": list(algorithms), "knob_dicts": knob_dicts,
              "bounds_check": bounds_check, "target": json.loads(target)}
    if resume is not None and resume.params != params:
        raise ValueError(f"the campaign resumed was run with {resume.params}; this one is {params}")
    res = copy.deepcopy(resume) if resume is not None else CampaignResult(campaign_seed, params=params)
    res.interrupted = False
    finished = set(res.done)
    indices = [i for i in (list(only) if only is not None else list(range(layers))) if i not in finished]
    step = Progress("fuzz", len(indices)).step if progress else (lambda what: None)
    local = threading.local()
    workers, lock = [], threading.Lock()
    start, before = time.monotonic(), res.elapsed_s

    def run(i: int):
        wk = getattr(local, "worker", None)
        if wk is None or local.done >= recycle:
            if wk is not None:
                wk.close()
            wk = local.worker = Worker()
            local.done = 0
            with lock:
                workers.append(wk)
        layer = generate_layer(campaign_seed, i)
        outcomes = run_fuzz_layer(layer, wk, algorithms, target, knob_dicts, bounds_check, timeout, job)
        local.done += 1
        return layer, outcomes

    jobs = max(1, int(jobs)) if isolated() else 1  # in-process jobs would share one TVM
    try:
        for layer, outcomes in _in_order(run, indices, jobs):
            res.layers += 1
            for o in outcomes:
                res.candidates += 1
                res.seconds_by_algorithm[o.algorithm] = res.seconds_by_algorithm.get(o.algorithm, 0.0) + o.seconds
                if o.status == "refused":
                    res.refusals += 1
                elif o.status in ("wrong", "error"):
                    res.wrong += o.status == "wrong"
                    res.errors += o.status == "error"
                    case = failure_case(layer, o, campaign_seed, target)
                    res.failures.append(case)
                    on_failure(case)
            res.done.append(layer.index)
            res.elapsed_s = before + time.monotonic() - start
            on_layer(res)
            bad = sum(o.status in ("wrong", "error") for o in outcomes)
            step(f"layer {layer.index} (seed {layer.seed}): {len(outcomes)} candidates"
                 f"{f', {bad} FAILED' if bad else ''}")
    except KeyboardInterrupt:
        res.interrupted = True
    finally:
        for wk in workers:
            wk.close()
    res.elapsed_s = before + time.monotonic() - start
    return res


def _in_order(fn, items: list, jobs: int):
    """fn(item) for each item, in order; with jobs > 1, up to ``jobs`` at once in threads (and a
    few queued), nothing left running or queued once the caller stops taking results."""
    if jobs == 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        it = iter(items)
        pending = deque(pool.submit(fn, i) for i in itertools.islice(it, 2 * jobs))
        while pending:
            out = pending.popleft().result()
            for i in itertools.islice(it, 1):
                pending.append(pool.submit(fn, i))
            yield out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
