"""hybrid: halo segments where a channel's segment is dense, per-pixel entries where it is sparse.

Specified in docs/algorithms.md section 9.

halo does all B*Kw products of a stored (segment, channel), zeros included, but each weight
vector it loads serves B pixels (FMAs from registers); pixcsr multiplies no zero, but each FMA
loads its own weight vector, which halves the FMA rate on this CPU. Per (row, segment,
channel) the encoder picks the cheaper: ``pairs``, the (pixel, kernel column) products whose
input value is non-zero, against the knob ``dense_from`` (default: DENSE_SHARE of B*Kw).

Format (reference/hybrid.py states it exactly): halo's segments (block B, L values), channels
in blocks of cb = the knob ``c_block`` (nkb blocks), pointer rows in (n, h, kb, t) order:

    hyb_hptr   (N*H*nkb*nseg + 1,)     int32    halo entries per (n, h, kb, t)
    hyb_hchan  (N*H*nseg*C,)           int32
    hyb_hval   (L, N*H*nseg*C)         float32  offset-major
    hyb_pptr   (N*H*nkb*nseg*L + 1,)   int32    pixel entries per (n, h, kb, t, offset o)
    hyb_pcode  (N*H*nseg*C*Lr,)        int32    c*Kw + o; Lr = offsets some (b, q) reads
    hyb_pval   (N*H*nseg*C*Lr,)        float32  (worst case: every element non-zero)

The encoder is one TIR PrimFunc (count, two prefix sums, fill), parallel over input rows. Each
pass copies each channel block of its row channels-last (lanes.channels_last_block), then
handles a vector of channels of a segment at once: their pairs, and the entries of each kind written
by compress-in-register + masked stores (popcounts when counting): no data-dependent branch.

The multiply is output-stationary with pixcsr's tasks (m-tile, image, ``rows`` output rows)
and halo's register tile (B pixels x m_tile channels; weights [M/m_tile][Kh][C*Kw][m_tile]):
per (channel block, kernel row), whose Kw*cb weight vectors stay in L1 for the task's pixels,
each group of B pixels loads its partial sums, walks the segment's halo entries, then for each
pixel b the pixel entries of the offsets it reads (one pointer range when Dw = 1),
acc[b, :] += v * w[mo, l, code - b*Sw, :], and stores them; then y through the epilogue.

x is NCHW, or in channel blocks, and y (and the residual) too (knobs ``layout_in``,
``layout_out``; docs/algorithms.md section 16): the encoder's channels-last copy of a block is
then a plain copy, the store one vector of channels per pixel; the encoding is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..cpu import CPU, cpu_of
from ..layout import NCHW_LAYOUTS, layout_of_block, layout_shape
from ..reference.halo import HaloGeometry, halo_geometry
from ..reference.hybrid import hybrid_encode, hybrid_multiply, hybrid_storage, offset_reads
from .base import (Algorithm, Buffer, KnobError, Stage, bias_constant, drop_unused, epilogue_inputs, grid, is_read,
                   knob_blocks, prim, register, registers_ok)
from .halo import halo_entries, halo_weights, segment_column, segment_holds
from .lanes import Lanes, channels_last_block
from .pixcsr import row_task_defaults
from .tiling import Tiling, finish_rows, row_store, row_store_bias, start_rows, tile_pixels, two_pass_encode

# A pixel entry's FMA loads its weight vector; a halo entry's reuse it B times (~200 useful
# GFLOP/s for pixcsr against ~400 for halo at density 1 here). With both in one kernel, a sweep
# of dense_from on the 3x3 issue-5 layers at densities 0.3 and 0.5 was best at 7-8 of 12.
DENSE_SHARE = 0.65


@register
class Hybrid(Algorithm):
    name = "hybrid"
    sparse = True
    fuses_residual = True

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        """block up to 4 (x m_tile 64: 16 accumulators on AVX-512), m_tile, c_block and rows as
        pixcsr's with tiles up to 4 vectors, dense_from = DENSE_SHARE * B * Kw.

        1x1 kernels (no window overlap: a longer segment only multiplies more zeros): block 2
        x m_tile up to 128 (AVX-512), weight blocks of 64 channels, 2-row tasks; on the 14x14
        ResNet 1x1s 10-12 % faster than the 3x3 defaults, on 28x28 ones within 3 % (interleaved
        timings at densities 0.3/0.5). The tile never holds more than cpu.accumulators."""
        if (spec.kernel_h, spec.kernel_w) == (1, 1):
            most = 2
            tiles = [t for t in (128, 64, 32) if t * most <= cpu.accumulators * cpu.lanes]
            knobs = {**row_task_defaults(spec, cpu, tiles), "c_block": min(64, spec.in_channels),
                     "rows": min(2, spec.out_h)}
        else:
            most = 4
            knobs = row_task_defaults(spec, cpu, [t for t in (64, 32) if t <= 4 * cpu.lanes])
        knobs["block"] = min(tile_pixels(cpu, knobs["m_tile"], most), spec.out_w)
        return {**knobs, "dense_from": max(1, math.ceil(DENSE_SHARE * knobs["block"] * spec.kernel_w)), **NCHW_LAYOUTS}

    def _checked(self, knobs) -> tuple[int, int, int, int, int, int, int]:
        """(block, m_tile, c_block, rows, dense_from, x's channel block, y's channel block; 0: NCHW)."""
        names = ("block", "m_tile", "c_block", "rows", "dense_from")
        for name in names:
            v = knobs[name]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise KnobError(f"{self.name}: knob {name} must be a positive int, got {v!r}")
        return (*(int(knobs[k]) for k in names), *knob_blocks(self.name, knobs))

    def constants(self, spec, weight, bias, knobs):
        _, mt, *_, cbo = self._checked(knobs)
        return {"w": halo_weights(weight, mt), **bias_constant(spec, bias, row_store_bias(spec, mt, cbo))}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        B, mt, cb, R, dense_from, cbi, cbo = self._checked(knobs)
        f = _Format(spec, halo_geometry(spec, B), cb)
        outs = (Buffer("hyb_hptr", (f.hrows + 1,), "int32"), Buffer("hyb_hchan", (f.hcap,), "int32"),
                Buffer("hyb_hval", (f.geo.seg_len, f.hcap)), Buffer("hyb_pptr", (f.prows + 1,), "int32"),
                Buffer("hyb_pcode", (f.pcap,), "int32"), Buffer("hyb_pval", (f.pcap,)))
        y = Buffer("y", layout_shape(spec.y_shape, layout_of_block(cbo)))
        return [Stage("encode", "encode", prim(_encode_func(f, Lanes(cpu_of(cpu)), dense_from, cbi)), ("x",), outs),
                Stage("multiply", "multiply", prim(_multiply_func(f, mt, R, epilogue, cbo)),
                      tuple(b.name for b in outs) + ("w",) + epilogue_inputs(epilogue), (y,))]

    def storage(self, spec, knobs, produced):
        return hybrid_storage(spec, knobs["block"], produced["hyb_hptr"], produced["hyb_pptr"])

    def _encode(self, spec, knobs, x):
        B, _, cb, _, dense_from, _, _ = self._checked(knobs)
        return hybrid_encode(spec, x, B, cb, dense_from)

    def reference_storage(self, spec, knobs, x):
        enc = self._encode(spec, knobs, x)
        return hybrid_storage(spec, knobs["block"], enc[0], enc[3])

    def reference(self, spec, knobs, x, w):
        return hybrid_multiply(spec, knobs["block"], knobs["c_block"], *self._encode(spec, knobs, x), w)

    def knob_grid(self, spec, cpu):
        # halo's register tiles, pixcsr's weight blocks, the dense share around the default
        for k in grid(block=(2, 3, 4, 8), m_tile=(32, 64, 128), c_block=(32, 64, 128), rows=(2, 4)):
            cb = min(k["c_block"], spec.in_channels)
            if registers_ok(cpu, k["block"], k["m_tile"]) and k["block"] <= spec.out_w and cb == k["c_block"]:
                products = k["block"] * spec.kernel_w
                for share in (0.5, 0.65, 0.8):
                    yield {**k, "dense_from": max(1, round(share * products))}


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


def _encode_func(f: _Format, vec: Lanes, dense_from: int, cbi: int):
    spec, geo, cb = f.spec, f.geo, f.cb
    N, C, H, W = spec.x_shape
    L, nseg, Kw, per = geo.seg_len, geo.n_seg, spec.kernel_w, f.nkb * geo.n_seg  # per: halo rows per input row
    reads = offset_reads(spec, geo.block)
    V = vec.n  # channels per vector
    n_groups, cw = -(-cb // V), vec.block_width(cb)

    def value(v, k):
        return v[vec.ramp(k * V)]

    def pairs(v):
        """Per lane: the (pixel, kernel column) products whose value is non-zero."""
        total = vec.bcast(0)
        for k, r in enumerate(reads):
            if r:
                total = total + vec.bcast(r) * tvm.tirx.Cast(f"int32x{V}", vec.nonzero(value(v, k)))
        return total

    def kind(v, kb, g, dense: bool):
        """Per lane: a halo entry (dense) or pixel entries (not dense); an expression, not a
        variable: an assigned TIR variable lives in memory and is reloaded after every store."""
        p = pairs(v)
        cmp = p >= vec.bcast(dense_from) if dense else p < vec.bcast(dense_from)
        return tvm.tirx.And(cmp, vec.block_lanes(C, cb, kb, g))

    def pixels(v, kb, g, k):
        """Per lane: offset k is a pixel entry (a non-zero of a sparse segment)."""
        return tvm.tirx.And(kind(v, kb, g, False), vec.nonzero(value(v, k)))

    def channels(kb, g):
        return vec.ramp(kb * cb + g * V)

    @T.macro
    def group(xt, hchan, hval, pcode, pval, hpos, ppos, kb, t, g, fill):
        """V channels of block kb in segment t of the row in xt: their L values (one vector
        load each; lanes past the block or C are masked off), the kind of each decided by its
        pairs, halo and pixel entries stored by compress stores, counted by popcounts."""
        v = T.alloc_buffer((L * V,), "float32", scope="global")  # a stack array: kept in registers
        for k in T.unroll(L):
            v[vec.ramp(k * V)] = T.if_then_else(segment_holds(spec, geo, t, k),
                                                xt[vec.ramp(segment_column(spec, geo, t, k) * cw + g * V)],
                                                vec.bcast(0.0, "float32"))
        if fill:
            vec.compress_store(hchan, hpos[0], channels(kb, g), kind(v, kb, g, True))
            for k in T.unroll(L):
                vec.compress_store(hval, (k, hpos[0]), value(v, k), kind(v, kb, g, True))
        hpos[0] = hpos[0] + vec.count(kind(v, kb, g, True))  # dense_from >= 1: a dense lane has a non-zero
        for k in T.unroll(L):
            if fill:
                vec.compress_store(pcode, ppos[k], channels(kb, g) * vec.bcast(Kw) + vec.bcast(k), pixels(v, kb, g, k))
                vec.compress_store(pval, ppos[k], value(v, k), pixels(v, kb, g, k))
            ppos[k] = ppos[k] + vec.count(pixels(v, kb, g, k))

    @T.macro
    def row_pass(x, hptr, hchan, hval, pptr, pcode, pval, u, fill):
        """Input row u = (n, h), segment by segment of each channel block, V channels at a
        time: each (segment, channel) is one halo entry, or one pixel entry per non-zero, or
        nothing. Entries are written by compress stores, so the fill has no data-dependent branch
        and writes nothing but entries; the L + 1 pointer rows' next slots stay in registers."""
        n, h = u // H, u % H
        xt = T.alloc_buffer((W * cw,), "float32")  # block kb channels-last: V channels are one load
        for kb in range(f.nkb):
            if is_read(spec, 0, h):
                channels_last_block(vec, xt, x, n, h, kb, cb, C, W, cbi)
            for t in range(nseg):
                row = u * per + kb * nseg + t  # halo pointer row (n, h, kb, t); its pixel rows row*L + o
                hpos = T.alloc_buffer((1,), "int32", scope="global")
                ppos = T.alloc_buffer((L,), "int32", scope="global")
                start_rows(hptr, hpos, row, 1, fill, True)
                start_rows(pptr, ppos, row * L, L, fill, True)
                if is_read(spec, 0, h):
                    for g in range(n_groups):
                        group(xt, hchan, hval, pcode, pval, hpos, ppos, kb, t, g, fill)
                finish_rows(hptr, hpos, row, 1, fill, True)
                finish_rows(pptr, ppos, row * L, L, fill, True)

    @T.prim_func
    def encode(x: T.Buffer(layout_shape(spec.x_shape, layout_of_block(cbi)), "float32"),
               hptr: T.Buffer((f.hrows + 1,), "int32"),
               hchan: T.Buffer((f.hcap,), "int32"), hval: T.Buffer((L, f.hcap), "float32"),
               pptr: T.Buffer((f.prows + 1,), "int32"), pcode: T.Buffer((f.pcap,), "int32"),
               pval: T.Buffer((f.pcap,), "float32")):
        two_pass_encode(N * H, f.hrows, hptr,
                        lambda u, fill: row_pass(x, hptr, hchan, hval, pptr, pcode, pval, u, fill),
                        f.prows, pptr)

    return encode


def _multiply_func(f: _Format, mt: int, R: int, ep: Epilogue, cbo: int):
    spec, geo = f.spec, f.geo
    N, C, H = spec.batch, spec.in_channels, spec.height
    M, Kh, Kw, Oh, B = spec.out_channels, spec.kernel_h, spec.kernel_w, spec.out_h, geo.block
    (sh, sw), (dh, dw), pt = spec.stride, spec.dilation, spec.padding[0]
    L, nseg, nkb = geo.seg_len, geo.n_seg, f.nkb
    tl = Tiling(B, mt, "fused", -(-M // mt), nseg, 0)  # the register tile halo_entries works on
    n_groups = -(-Oh // R)
    units = tl.n_tiles * N * n_groups
    store = row_store(spec, mt, cbo)  # y through the epilogue, in y's layout

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
            halo_entries(spec, tl, hptr, hchan, lambda e, k: hval[k, e], w, acc, mo, l, seg)
            for b in T.unroll(B):
                if dw == 1:  # pixel b reads offsets b*Sw .. b*Sw+Kw-1: one range, q = o - b*Sw
                    pixel_entries(pptr, pcode, pval, w, acc, mo, l, b, seg * L + b * sw, seg * L + b * sw + Kw,
                                  b * sw)
                else:
                    for q in T.unroll(Kw):
                        o = b * sw + q * dw
                        pixel_entries(pptr, pcode, pval, w, acc, mo, l, b, seg * L + o, seg * L + o + 1, o - q)

    @T.macro
    def out_rows(hptr, hchan, hval, pptr, pcode, pval, w, bias, res, y, u):
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
        store(y, part, bias, res, ep, n, r0, R, mo * mt)

    wshape = (tl.n_tiles, Kh, C * Kw, mt)
    y_shape = layout_shape(spec.y_shape, layout_of_block(cbo))
    bias_len = row_store_bias(spec, mt, cbo)

    @T.prim_func
    def multiply(hptr: T.Buffer((f.hrows + 1,), "int32"), hchan: T.Buffer((f.hcap,), "int32"),
                 hval: T.Buffer((L, f.hcap), "float32"), pptr: T.Buffer((f.prows + 1,), "int32"),
                 pcode: T.Buffer((f.pcap,), "int32"), pval: T.Buffer((f.pcap,), "float32"),
                 w: T.Buffer(wshape, "float32"), bias: T.Buffer((bias_len,), "float32"),
                 res: T.Buffer(y_shape, "float32"), y: T.Buffer(y_shape, "float32")):
        for u in T.parallel(units):
            out_rows(hptr, hchan, hval, pptr, pcode, pval, w, bias, res, y, u)

    return drop_unused(multiply, ep)
