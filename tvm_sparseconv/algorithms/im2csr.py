"""im2csr: the CSR of the im2col matrix, built straight from the NCHW input, times dense weights.

Format (docs/algorithms.md section 6), row-blocked by the knob ``block`` = B (B = 1 is plain im2CSR):
a row is a group of B consecutive output pixels of one output row, g = (n, r, sb), pixels
s = sb*B + b (b < B; pixels s >= Ow do not exist and read 0); a column is k = (c*Kh + l)*Kw + q;
the entry (g, k) holds the B values Xpad[n, c, r*Sh + l*Dh, s*Sw + q*Dw] and is stored when any
of them is non-zero. Arrays (worst case: every entry stored):

    csr_ptr  (N*Oh*ceil(Ow/B) + 1,)        int32    row pointers
    csr_col  (N*Oh*ceil(Ow/B)*C*Kh*Kw,)    int32    column k of each entry, ascending in a row
    csr_val  (N*Oh*ceil(Ow/B)*C*Kh*Kw, B)  float32  the B values of each entry

The encoder is one TIR PrimFunc: count per row, prefix sum, fill (without data-dependent
branches); both passes run in parallel over output rows and read each input-row segment once
for the Kw entries it feeds. The multiply is output-stationary: per (row, tile of m_tile output
channels) the B x m_tile accumulators live in registers, and each weight vector w[mo, k, :]
(weights re-laid-out at build time as [M/m_tile][C*Kh*Kw][m_tile], M zero-padded to whole
tiles) is loaded once for the B pixels.

The output-stationary tiling it shares with halo lives in tiling.py.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..cpu import CPU
from ..reference.im2csr import im2csr_encode, im2csr_multiply, im2csr_storage
from .base import (Algorithm, Buffer, Stage, bias_constant, drop_unused, epilogue_inputs, grid, prim, register,
                   registers_ok)
from .tiling import (TILE_SPLITS, Tiling, emit_entry, finish_rows, for_each_tile, group_coords, make_tiling, start_rows,
                     store_tile, tile_weights, tiling_defaults, two_pass_encode, zero_tile)

@register
class Im2CSR(Algorithm):
    name = "im2csr"
    sparse = True
    fuses_residual = True

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        return tiling_defaults(spec, cpu)

    def constants(self, spec, weight, bias, knobs):
        tl = make_tiling(self.name, spec, knobs)
        wr = weight.reshape(spec.out_channels, -1).T  # [C*Kh*Kw][M], rows k = (c*Kh + l)*Kw + q
        return {"w": tile_weights(wr, tl.m_tile), **bias_constant(spec, bias)}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        tl = make_tiling(self.name, spec, knobs)
        cap = tl.n_groups * spec.in_channels * spec.kernel_h * spec.kernel_w
        outs = (Buffer("csr_ptr", (tl.n_groups + 1,), "int32"), Buffer("csr_col", (cap,), "int32"),
                Buffer("csr_val", (cap, tl.block)))
        return [Stage("encode", "encode", prim(_encode_func(spec, tl, cap)), ("x",), outs),
                Stage("multiply", "multiply", prim(_multiply_func(spec, tl, cap, epilogue)),
                      ("csr_ptr", "csr_col", "csr_val", "w") + epilogue_inputs(epilogue),
                      (Buffer("y", spec.y_shape),))]

    def storage(self, spec, knobs, produced):
        return im2csr_storage(spec, knobs["block"], produced["csr_ptr"])

    def reference_storage(self, spec, knobs, x):
        return im2csr_storage(spec, knobs["block"], im2csr_encode(spec, x, knobs["block"])[0])

    def reference(self, spec, knobs, x, w):
        return im2csr_multiply(spec, knobs["block"], *im2csr_encode(spec, x, knobs["block"]), w)

    def knob_grid(self, spec, cpu):
        for k in grid(block=(2, 3, 4, 6, 8), m_tile=(16, 32, 64), split=TILE_SPLITS):
            if registers_ok(cpu, k["block"], k["m_tile"]) and k["block"] <= spec.out_w:
                yield k

def _encode_func(spec: Conv2DSpec, tl: Tiling, cap: int):
    N, C, H, W = spec.x_shape
    Kh, Kw, B = spec.kernel_h, spec.kernel_w, tl.block
    (sh, sw), (dh, dw), pt, pl = spec.stride, spec.dilation, spec.padding[0], spec.padding[1]
    Ow, rows, per_row = spec.out_w, tl.n_groups, tl.per_row
    L = (B - 1) * sw + (Kw - 1) * dw + 1  # input columns the B pixels read in one input row

    @T.macro
    def row_pass(x, ptr, col, val, u, fill):
        """The per_row groups of output row u = (n, r): each input row segment read once."""
        n, r = u // spec.out_h, u % spec.out_h
        pos = T.alloc_local((per_row,), "int32")
        start_rows(ptr, pos, u * per_row, per_row, fill)
        for c, l in T.grid(C, Kh):
            i = r * sh + l * dh - pt
            if i >= 0 and i < H:
                for t in range(per_row):
                    j0 = t * B * sw - pl  # real column of the first one the group reads
                    seg = T.alloc_local((L,), "float32")  # shared by the Kw entries
                    for k in T.unroll(L):
                        seg[k] = T.if_then_else(j0 + k >= 0 and j0 + k < W,
                                                x[n, c, i, T.max(T.min(j0 + k, W - 1), 0)], T.float32(0))
                    for q in T.unroll(Kw):
                        v = T.alloc_local((B,), "float32")
                        for b in T.unroll(B):
                            v[b] = T.if_then_else(Ow % B == 0 or t * B + b < Ow, seg[b * sw + q * dw],
                                                  T.float32(0))
                        emit_entry(ptr[u * per_row + t + 1], col, val, pos, t, (c * Kh + l) * Kw + q, v, B, fill)
        finish_rows(ptr, pos, u * per_row, per_row, fill)

    @T.prim_func
    def encode(x: T.Buffer((N, C, H, W), "float32"), ptr: T.Buffer((rows + 1,), "int32"),
               col: T.Buffer((cap,), "int32"), val: T.Buffer((cap, B), "float32")):
        two_pass_encode(N * spec.out_h, rows, ptr, lambda u, fill: row_pass(x, ptr, col, val, u, fill))

    return encode


def _multiply_func(spec: Conv2DSpec, tl: Tiling, cap: int, ep: Epilogue):
    B, mt, K = tl.block, tl.m_tile, spec.in_channels * spec.kernel_h * spec.kernel_w
    rows = tl.n_groups

    @T.macro
    def tile(ptr, col, val, w, bias, res, y, mo, g):
        n, r, s0 = group_coords(spec, tl, g)
        acc = T.alloc_local((B, mt), "float32")
        zero_tile(acc, tl)
        for e in range(ptr[g], ptr[g + 1]):
            k = col[e]
            for b in T.unroll(B):
                for j in T.vectorized(mt):
                    acc[b, j] = acc[b, j] + val[e, b] * w[mo, k, j]
        store_tile(y, acc, bias, res, spec, tl, ep, n, r, s0, mo * mt)

    @T.prim_func
    def multiply(ptr: T.Buffer((rows + 1,), "int32"), col: T.Buffer((cap,), "int32"),
                 val: T.Buffer((cap, B), "float32"), w: T.Buffer((tl.n_tiles, K, mt), "float32"),
                 bias: T.Buffer((spec.out_channels,), "float32"),
                 res: T.Buffer(spec.y_shape, "float32"), y: T.Buffer(spec.y_shape, "float32")):
        for_each_tile(tl, lambda mo, g: tile(ptr, col, val, w, bias, res, y, mo, g))

    return drop_unused(multiply, ep)
