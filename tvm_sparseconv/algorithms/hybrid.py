"""hybrid: halo segments where a channel's segment is dense, per-pixel entries where it is sparse.

halo does all B*Kw products of a stored (segment, channel), zeros included, but each weight
vector it loads serves B pixels (FMAs from registers); pixcsr multiplies no zero, but each FMA
loads its own weight vector, which halves the FMA rate on this CPU. Per (row, segment,
channel) the encoder picks the cheaper: ``pairs``, the (pixel, kernel column) products whose
input value is non-zero, against the knob ``dense_from`` (default: DENSE_SHARE of B*Kw).

Format (reference/hybrid.py states it exactly), halo's segments (block B, L values):

    hyb_hptr   (N*H*nseg + 1,)       int32    halo entries per (n, h, t)
    hyb_hchan  (N*H*nseg*C,)         int32
    hyb_hval   (N*H*nseg*C, L)       float32
    hyb_pptr   (N*H*nseg*L + 1,)     int32    pixel entries per (n, h, t, offset o)
    hyb_pcode  (N*H*nseg*C*Lr,)      int32    c*Kw + o; Lr = offsets some (b, q) reads
    hyb_pval   (N*H*nseg*C*Lr,)      float32  (worst case: every element non-zero)

The encoder is one TIR PrimFunc (count, two prefix sums, fill) over input rows. The multiply
is halo's register tile (B pixels x m_tile channels, weights [M/m_tile][Kh][C*Kw][m_tile]):
per kernel row it walks the segment's halo entries, then, for each pixel b, the pixel entries
of the offsets it reads (one pointer range when Dw = 1), acc[b, :] += v * w[mo, l, code - b*Sw, :].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..reference.halo import HaloGeometry, halo_geometry
from ..reference.hybrid import hybrid_encode, hybrid_multiply, hybrid_storage, offset_reads
from .base import Algorithm, Buffer, KnobError, Stage, bias_constant, is_read, nonzero, prim
from .halo import halo_entries, halo_weights, load_segment
from .pixcsr import row_task_defaults
from .tiling import Tiling, emit_entry, finish_rows, start_rows, store_rows, two_pass_encode

# A pixel entry's FMA loads its weight vector; a halo entry's reuse it B times. Measured here
# (bench_layers.sh): ~200 useful GFLOP/s for pixcsr against ~400 for halo at density 1, so a
# segment goes dense when at least about half of its B*Kw products are on non-zeros.
DENSE_SHARE = 0.65


class Hybrid(Algorithm):
    name = "hybrid"
    sparse = True

    def default_knobs(self, spec: Conv2DSpec) -> dict:
        """block 4 (x m_tile 64: 16 accumulators), m_tile, c_block and rows as pixcsr's with
        tiles up to 64, dense_from = DENSE_SHARE * B * Kw."""
        knobs = {"block": min(4, spec.out_w), **row_task_defaults(spec, (64, 32))}
        return {**knobs, "dense_from": max(1, math.ceil(DENSE_SHARE * knobs["block"] * spec.kernel_w))}

    def _checked(self, knobs) -> tuple[int, int, int, int, int]:
        names = ("block", "m_tile", "c_block", "rows", "dense_from")
        for name in names:
            v = knobs[name]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise KnobError(f"{self.name}: knob {name} must be a positive int, got {v!r}")
        return tuple(int(knobs[k]) for k in names)

    def constants(self, spec, weight, bias, knobs):
        return {"w": halo_weights(weight, self._checked(knobs)[1]), **bias_constant(spec, bias)}

    def stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs) -> list[Stage]:
        B, mt, cb, R, dense_from = self._checked(knobs)
        f = _Format(spec, halo_geometry(spec, B), cb)
        outs = (Buffer("hyb_hptr", (f.hrows + 1,), "int32"), Buffer("hyb_hchan", (f.hcap,), "int32"),
                Buffer("hyb_hval", (f.hcap, f.geo.seg_len)), Buffer("hyb_pptr", (f.prows + 1,), "int32"),
                Buffer("hyb_pcode", (f.pcap,), "int32"), Buffer("hyb_pval", (f.pcap,)))
        bias = ("bias",) if epilogue.bias else ()
        return [Stage("encode", "encode", prim(_encode_func(f, dense_from)), ("x",), outs),
                Stage("multiply", "multiply", prim(_multiply_func(f, mt, R, epilogue)),
                      tuple(b.name for b in outs) + ("w",) + bias, (Buffer("y", spec.y_shape),))]

    def storage(self, spec, knobs, produced):
        return hybrid_storage(spec, knobs["block"], produced["hyb_hptr"], produced["hyb_pptr"])

    def _encode(self, spec, knobs, x):
        B, _, cb, _, dense_from = self._checked(knobs)
        return hybrid_encode(spec, x, B, cb, dense_from)

    def reference_storage(self, spec, knobs, x):
        enc = self._encode(spec, knobs, x)
        return hybrid_storage(spec, knobs["block"], enc[0], enc[3])

    def reference(self, spec, knobs, x, w):
        return hybrid_multiply(spec, knobs["block"], knobs["c_block"], *self._encode(spec, knobs, x), w)


@dataclass(frozen=True)
class _Format:
    """Static sizes: pointer rows (n, h, kb, t) for halo entries, (n, h, kb, t, o) for pixel ones."""

    spec: Conv2DSpec
    geo: HaloGeometry
    cb: int

    @property
    def nkb(self) -> int:
        return -(-self.spec.in_channels // self.cb)

    @property
    def hrows(self) -> int:
        return self.spec.batch * self.spec.height * self.nkb * self.geo.n_seg

    @property
    def prows(self) -> int:
        return self.hrows * self.geo.seg_len

    @property
    def hcap(self) -> int:
        return self.spec.batch * self.spec.height * self.geo.n_seg * self.spec.in_channels

    @property
    def pcap(self) -> int:  # every read offset of every (segment, channel) non-zero
        return self.hcap * sum(self.geo.read_offsets)


def _pairs(spec: Conv2DSpec, geo: HaloGeometry, v):
    """TIR: the (pixel, kernel column) products of a group whose value in v[0:L] is non-zero."""
    total = tvm.tirx.const(0, "int32")
    for k, reads in enumerate(offset_reads(spec, geo.block)):
        if reads:
            total = total + reads * tvm.tirx.Cast("int32", nonzero(v[k]))
    return total


def _encode_func(f: _Format, dense_from: int):
    spec, geo, cb = f.spec, f.geo, f.cb
    N, C, H, W = spec.x_shape
    L, nseg, Kw, per = geo.seg_len, geo.n_seg, spec.kernel_w, f.nkb * geo.n_seg  # per: halo rows per input row

    @T.macro
    def halo_entry(hchan, hval, hpos, hend, c, v, fill, keep):
        emit_entry(hend[0], hchan, hval, hpos, 0, c, v, L, fill, 0, keep)

    @T.macro
    def pixel_entries(pcode, pval, ppos, pend, c, v, fill, keep):
        for k in T.unroll(L):
            emit_entry(pend[k], pcode, pval, ppos, k, c * Kw + k, v, 1, fill, k, keep)

    @T.macro
    def row_pass(x, hptr, hchan, hval, pptr, pcode, pval, u, fill):
        """Input row u = (n, h), segment by segment of each channel block, channel by channel:
        each (segment, channel) is one halo entry, or one pixel entry per non-zero, or nothing.
        The segment's L + 1 pointer rows keep their next slots and ends in registers."""
        n, h = u // H, u % H
        for kb, t in T.grid(f.nkb, nseg):
            row = u * per + kb * nseg + t  # halo pointer row (n, h, kb, t); its pixel rows row*L + o
            hpos, hend = T.alloc_local((1,), "int32"), T.alloc_local((1,), "int32")
            ppos, pend = T.alloc_local((L,), "int32"), T.alloc_local((L,), "int32")
            start_rows(hptr, hpos, row, 1, fill, True)
            start_rows(pptr, ppos, row * L, L, fill, True)
            if fill:
                start_rows(hptr, hend, row + 1, 1, fill, True)
                start_rows(pptr, pend, row * L + 1, L, fill, True)
            if is_read(spec, 0, h):
                for cc in T.serial(cb):
                    c = kb * cb + cc
                    if C % cb == 0 or c < C:
                        v = T.alloc_local((L,), "float32")
                        load_segment(spec, geo, x, v, n, c, h, t)
                        pairs = _pairs(spec, geo, v)
                        if fill:  # branch once on the kind: stores are what the fill spends its time on
                            if pairs >= dense_from:
                                halo_entry(hchan, hval, hpos, hend, c, v, fill, True)
                            elif pairs > 0:
                                pixel_entries(pcode, pval, ppos, pend, c, v, fill, True)
                        else:  # counting: no branch
                            halo_entry(hchan, hval, hpos, hend, c, v, fill, pairs >= dense_from)
                            pixel_entries(pcode, pval, ppos, pend, c, v, fill, pairs < dense_from)
            finish_rows(hptr, hpos, row, 1, fill, True)
            finish_rows(pptr, ppos, row * L, L, fill, True)

    @T.prim_func
    def encode(x: T.Buffer((N, C, H, W), "float32"), hptr: T.Buffer((f.hrows + 1,), "int32"),
               hchan: T.Buffer((f.hcap,), "int32"), hval: T.Buffer((f.hcap, L), "float32"),
               pptr: T.Buffer((f.prows + 1,), "int32"), pcode: T.Buffer((f.pcap,), "int32"),
               pval: T.Buffer((f.pcap,), "float32")):
        two_pass_encode(N * H, f.hrows, hptr,
                        lambda u, fill: row_pass(x, hptr, hchan, hval, pptr, pcode, pval, u, fill),
                        f.prows, pptr)

    return encode


def _multiply_func(f: _Format, mt: int, R: int, ep: Epilogue):
    spec, geo = f.spec, f.geo
    N, C, H = spec.batch, spec.in_channels, spec.height
    M, Kh, Kw, Oh, B = spec.out_channels, spec.kernel_h, spec.kernel_w, spec.out_h, geo.block
    (sh, sw), (dh, dw), pt = spec.stride, spec.dilation, spec.padding[0]
    L, nseg, nkb = geo.seg_len, geo.n_seg, f.nkb
    tl = Tiling(B, mt, "fused", -(-M // mt), nseg, 0)  # the register tile halo_entries works on
    n_groups = -(-Oh // R)
    units = tl.n_tiles * N * n_groups

    @T.macro
    def pixel_entries(pptr, pcode, pval, w, acc, mo, l, b, lo, hi, shift):
        """acc[b, :] += v * w[mo, l, code - shift, :] for the pixel entries of rows lo .. hi-1."""
        for e in range(pptr[lo], pptr[hi]):
            for j in T.vectorized(mt):
                acc[b, j] = acc[b, j] + pval[e] * w[mo, l, pcode[e] - shift, j]

    @T.macro
    def group(hptr, hchan, hval, pptr, pcode, pval, w, acc, mo, kb, l, n, r, t):
        """acc += what block kb feeds output pixels t*B .. t*B+B-1 of row r in kernel row l."""
        i = r * sh + l * dh - pt
        if i >= 0 and i < H:
            seg = ((n * H + i) * nkb + kb) * nseg + t
            halo_entries(spec, tl, hptr, hchan, hval, w, acc, mo, l, seg)
            for b in T.unroll(B):
                if dw == 1:  # pixel b reads offsets b*Sw .. b*Sw+Kw-1: one range, q = o - b*Sw
                    pixel_entries(pptr, pcode, pval, w, acc, mo, l, b, seg * L + b * sw, seg * L + b * sw + Kw,
                                  b * sw)
                else:
                    for q in T.unroll(Kw):
                        o = b * sw + q * dw
                        pixel_entries(pptr, pcode, pval, w, acc, mo, l, b, seg * L + o, seg * L + o + 1, o - q)

    @T.macro
    def out_rows(hptr, hchan, hval, pptr, pcode, pval, w, bias, y, u):
        """Output rows (n, r0 .. r0+R-1) for m-tile mo: partial sums per group of B pixels,
        (channel block, kernel row) after (channel block, kernel row), whose Kw*cb weight
        vectors are read once for the R rows, then y through the epilogue."""
        mo, n, r0 = u // (N * n_groups), u // n_groups % N, u % n_groups * R
        part = T.alloc_buffer((R, nseg * B, mt), "float32")
        for kb, l, rr, t in T.grid(nkb, Kh, R, nseg):
            if Oh % R == 0 or r0 + rr < Oh:
                acc = T.alloc_local((B, mt), "float32")
                for b in T.unroll(B):
                    for j in T.vectorized(mt):
                        acc[b, j] = T.if_then_else(kb == 0 and l == 0, T.float32(0), part[rr, t * B + b, j])
                group(hptr, hchan, hval, pptr, pcode, pval, w, acc, mo, kb, l, n, r0 + rr, t)
                for b in T.unroll(B):
                    for j in T.vectorized(mt):
                        part[rr, t * B + b, j] = acc[b, j]
        store_rows(y, part, bias, spec, ep, n, r0, R, mo * mt, mt)

    wshape = (tl.n_tiles, Kh, C * Kw, mt)
    if ep.bias:
        @T.prim_func
        def multiply(hptr: T.Buffer((f.hrows + 1,), "int32"), hchan: T.Buffer((f.hcap,), "int32"),
                     hval: T.Buffer((f.hcap, L), "float32"), pptr: T.Buffer((f.prows + 1,), "int32"),
                     pcode: T.Buffer((f.pcap,), "int32"), pval: T.Buffer((f.pcap,), "float32"),
                     w: T.Buffer(wshape, "float32"), bias: T.Buffer((M,), "float32"),
                     y: T.Buffer(spec.y_shape, "float32")):
            for u in T.parallel(units):
                out_rows(hptr, hchan, hval, pptr, pcode, pval, w, bias, y, u)
    else:
        @T.prim_func
        def multiply(hptr: T.Buffer((f.hrows + 1,), "int32"), hchan: T.Buffer((f.hcap,), "int32"),
                     hval: T.Buffer((f.hcap, L), "float32"), pptr: T.Buffer((f.prows + 1,), "int32"),
                     pcode: T.Buffer((f.pcap,), "int32"), pval: T.Buffer((f.pcap,), "float32"),
                     w: T.Buffer(wshape, "float32"), y: T.Buffer(spec.y_shape, "float32")):
            for u in T.parallel(units):
                out_rows(hptr, hchan, hval, pptr, pcode, pval, w, None, y, u)
    return multiply


ALGORITHM = Hybrid()
