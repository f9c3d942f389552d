"""halo: halo segments, store-once and output-stationary.

Specified in docs/algorithms.md section 7.

Format (reference/halo.py states it exactly): each real input row h is cut into segments of
L = (B-1)*Sw + (Kw-1)*Dw + 1 padded columns at a step of B*Sw, B = the knob ``block``: segment t
holds the columns that output pixels t*B .. t*B+B-1 of an output row read in that input row.
Per (n, h, t) a pointer range; per entry its channel and the segment's L values, stored only
when any is non-zero (all-zero channels and regions cost nothing):

    halo_ptr   (N*H*nseg + 1,)      int32    nseg = ceil(Ow / B)
    halo_chan  (N*H*nseg*C,)        int32    ascending within a segment
    halo_val   (N*H*nseg*C, L)      float32

The encoder is one TIR PrimFunc: count per segment, prefix sum, fill (without data-dependent
branches); both passes run in parallel over input rows, each channel's row read contiguously.
The multiply, per group of B output pixels of output row r and tile of m_tile output channels:
for each kernel row l (input row r*Sh + l*Dh - pt) it walks the entries (c, v) of that row's
segment t and, for each kernel column q and pixel b, does
acc[b, :] += v[b*Sw + q*Dw] * w[mo, l, c*Kw + q, :] with the B x m_tile accumulators in registers
(weights re-laid-out at build time as [M/m_tile][Kh][C*Kw][m_tile], M zero-padded to whole
tiles: the Kw weight vectors of an entry are adjacent, a tile's weights contiguous); then it
stores y (NCHW) through the epilogue. At density 1 it is a register-tiled direct convolution.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..cpu import CPU
from ..reference.halo import HaloGeometry, halo_encode, halo_geometry, halo_multiply, halo_storage
from .base import (Algorithm, Buffer, Stage, bias_constant, drop_unused, epilogue_inputs, grid, is_read, prim, register,
                   registers_ok)
from .tiling import (TILE_SPLITS, Tiling, emit_entry, finish_rows, for_each_tile, group_coords, make_tiling,
                     start_rows, store_tile, tile_weights, tiling_defaults, two_pass_encode,
                     zero_tile)


@register
class Halo(Algorithm):
    name = "halo"
    sparse = True
    fuses_residual = True

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        # 8 pixels x 32 channels on AVX-512: fewer, cheaper segments to encode than 4 x 64, and as fast
        return tiling_defaults(spec, cpu, tiles=(32, 16))

    def constants(self, spec, weight, bias, knobs):
        return {"w": halo_weights(weight, make_tiling(self.name, spec, knobs).m_tile), **bias_constant(spec, bias)}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        tl = make_tiling(self.name, spec, knobs)
        geo = halo_geometry(spec, tl.block)
        segs = spec.batch * spec.height * geo.n_seg
        cap = segs * spec.in_channels
        outs = (Buffer("halo_ptr", (segs + 1,), "int32"), Buffer("halo_chan", (cap,), "int32"),
                Buffer("halo_val", (cap, geo.seg_len)))
        return [Stage("encode", "encode", prim(_encode_func(spec, geo, segs, cap)), ("x",), outs),
                Stage("multiply", "multiply", prim(_multiply_func(spec, geo, tl, segs, cap, epilogue)),
                      ("halo_ptr", "halo_chan", "halo_val", "w") + epilogue_inputs(epilogue),
                      (Buffer("y", spec.y_shape),))]

    def storage(self, spec, knobs, produced):
        return halo_storage(spec, knobs["block"], produced["halo_ptr"])

    def reference_storage(self, spec, knobs, x):
        return halo_storage(spec, knobs["block"], halo_encode(spec, x, knobs["block"])[0])

    def reference(self, spec, knobs, x, w):
        return halo_multiply(spec, knobs["block"], *halo_encode(spec, x, knobs["block"]), w)

    def knob_grid(self, spec, cpu):
        # block 5: 5 x 16 ran 1-16 % faster than 4 x 16 on VGG-16's layers on the Zen 3 (AVX2),
        # where 10 of 16 registers is the window kernel's best budget too (docs/algorithms.md 10.4)
        for k in grid(block=(2, 3, 4, 5, 6, 8), m_tile=(16, 32, 64), split=TILE_SPLITS):
            if registers_ok(cpu, k["block"], k["m_tile"]) and k["block"] <= spec.out_w:
                yield k

def halo_weights(weight, m_tile: int):
    """OIHW -> [M/m_tile][Kh][C*Kw][m_tile]: an entry's Kw weight vectors adjacent."""
    m, c, kh, kw = weight.shape
    return tile_weights(weight.transpose(2, 1, 3, 0).reshape(kh, c * kw, m), m_tile)


def _offset_is_read(geo: HaloGeometry, k):
    """TIR: offset k of a segment is read by some (b, q) (True when every offset is)."""
    unread = [o for o, r in enumerate(geo.read_offsets) if not r]
    return tvm.tirx.all(*[k != o for o in unread]) if unread else True


def segment_holds(spec: Conv2DSpec, geo: HaloGeometry, t, k):
    """TIR: offset k of segment t holds a value: a real column (not padding, not past the last
    column read) that some (b, q) reads; otherwise the segment holds 0 there."""
    j = t * geo.step - spec.padding[1] + k
    return tvm.tirx.all(j >= 0, j < min(spec.width, geo.read_w - spec.padding[1]), _offset_is_read(geo, k))


def segment_column(spec: Conv2DSpec, geo: HaloGeometry, t, k):
    """TIR: the real column of offset k of segment t, clamped into [0, W) (a safe index where
    segment_holds is false)."""
    return T.max(T.min(t * geo.step - spec.padding[1] + k, spec.width - 1), 0)


@T.macro
def load_segment(spec: Conv2DSpec, geo: HaloGeometry, x, v, n, c, h, t):
    """v[0:L] = segment t of channel c of input row (n, h), 0 where it holds no value."""
    for k in T.unroll(geo.seg_len):
        v[k] = T.if_then_else(segment_holds(spec, geo, t, k), x[n, c, h, segment_column(spec, geo, t, k)],
                              T.float32(0))


def _encode_func(spec: Conv2DSpec, geo: HaloGeometry, segs: int, cap: int):
    N, C, H, W = spec.x_shape
    L, nseg = geo.seg_len, geo.n_seg

    @T.macro
    def row_pass(x, ptr, chan, val, u, fill):
        """The nseg segments of input row u = (n, h): channel by channel, each row read once."""
        n, h = u // H, u % H
        pos = T.alloc_local((nseg,), "int32")
        start_rows(ptr, pos, u * nseg, nseg, fill)
        if is_read(spec, 0, h):
            for c, t in T.grid(C, nseg):
                v = T.alloc_local((L,), "float32")
                load_segment(spec, geo, x, v, n, c, h, t)
                emit_entry(ptr[u * nseg + t + 1], chan, val, pos, t, c, v, L, fill)
        finish_rows(ptr, pos, u * nseg, nseg, fill)

    @T.prim_func
    def encode(x: T.Buffer((N, C, H, W), "float32"), ptr: T.Buffer((segs + 1,), "int32"),
               chan: T.Buffer((cap,), "int32"), val: T.Buffer((cap, L), "float32")):
        two_pass_encode(N * H, segs, ptr, lambda u, fill: row_pass(x, ptr, chan, val, u, fill))

    return encode


@T.macro
def halo_entries(spec: Conv2DSpec, tl: Tiling, ptr, chan, value, w, acc, mo, l, seg):
    """acc[b, :] += v[b*Sw + q*Dw] * w[mo, l, c*Kw + q, :] for every entry (c, v) of segment
    seg, kernel column q and pixel b: each weight vector loaded serves the block's pixels.
    value(e, k) is offset k of entry e's values."""
    for e in range(ptr[seg], ptr[seg + 1]):
        c = chan[e]
        for q in T.unroll(spec.kernel_w):
            for b in T.unroll(tl.block):
                for j in T.vectorized(tl.m_tile):
                    acc[b, j] = acc[b, j] + value(e, b * spec.stride[1] + q * spec.dilation[1]) * \
                        w[mo, l, c * spec.kernel_w + q, j]


def _multiply_func(spec: Conv2DSpec, geo: HaloGeometry, tl: Tiling, segs: int, cap: int, ep: Epilogue):
    C, H = spec.in_channels, spec.height
    Kh, Kw, B, mt = spec.kernel_h, spec.kernel_w, tl.block, tl.m_tile
    (sh, sw), (dh, dw), pt = spec.stride, spec.dilation, spec.padding[0]
    L, nseg = geo.seg_len, geo.n_seg

    @T.macro
    def tile(ptr, chan, val, w, bias, res, y, mo, g):
        n, r, s0 = group_coords(spec, tl, g)
        acc = T.alloc_local((B, mt), "float32")
        zero_tile(acc, tl)
        for l in range(Kh):
            i = r * sh + l * dh - pt
            if i >= 0 and i < H:
                halo_entries(spec, tl, ptr, chan, lambda e, k: val[e, k], w, acc, mo, l, (n * H + i) * nseg + g % nseg)
        store_tile(y, acc, bias, res, spec, tl, ep, n, r, s0, mo * mt)

    @T.prim_func
    def multiply(ptr: T.Buffer((segs + 1,), "int32"), chan: T.Buffer((cap,), "int32"),
                 val: T.Buffer((cap, L), "float32"), w: T.Buffer((tl.n_tiles, Kh, C * Kw, mt), "float32"),
                 bias: T.Buffer((spec.out_channels,), "float32"),
                 res: T.Buffer(spec.y_shape, "float32"), y: T.Buffer(spec.y_shape, "float32")):
        for_each_tile(tl, lambda mo, g: tile(ptr, chan, val, w, bias, res, y, mo, g))

    return drop_unused(multiply, ep)
