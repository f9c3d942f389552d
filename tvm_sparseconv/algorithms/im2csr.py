"""im2csr: the CSR of the im2col matrix, built straight from the NCHW input, times dense weights.

Format (algorithms.md section 6), row-blocked by the knob ``block`` = B (B = 1 is plain im2CSR):
a row is a group of B consecutive output pixels of one output row, g = (n, r, sb), pixels
s = sb*B + b (b < B; pixels s >= Ow do not exist and read 0); a column is k = (c*Kh + l)*Kw + q;
the entry (g, k) holds the B values Xpad[n, c, r*Sh + l*Dh, s*Sw + q*Dw] and is stored when any
of them is non-zero. Arrays (worst case: every entry stored):

    csr_ptr  (N*Oh*ceil(Ow/B) + 1,)        int32    row pointers
    csr_col  (N*Oh*ceil(Ow/B)*C*Kh*Kw,)    int32    column k of each entry, ascending in a row
    csr_val  (N*Oh*ceil(Ow/B)*C*Kh*Kw, B)  float32  the B values of each entry

The encoder is one TIR PrimFunc (count per row, prefix sum, fill; both passes parallel over
rows). The multiply is output-stationary: per (row, tile of m_tile output channels) the B x m_tile
accumulators live in registers, and each weight vector w[k, m-tile] (weights re-laid-out at build
time as [C*Kh*Kw][M], M zero-padded to whole tiles) is loaded once for the B pixels.

This module also holds the output-stationary pieces the halo algorithm shares (Tiling, the
tile loops, the epilogue store, the two-pass encoder skeleton).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..reference.im2csr import im2csr_encode, im2csr_multiply, im2csr_storage
from .base import Algorithm, Buffer, KnobError, Stage, bias_constant, epilogue_value, prim

# How the (m-tile, group) work is split across threads:
#   tile_outer  for each m-tile (serial): all groups in parallel (the m-tile's weights stay in L2)
#   fused       one parallel loop over (m-tile, group)
#   tile_inner  groups in parallel, every m-tile of a group in turn (the group's entries stay in L1)
SPLITS = ("tile_outer", "fused", "tile_inner")
M_TILES = (64, 32, 16)


# --- output-stationary tiling (shared with halo) ----------------------------------------------
@dataclass(frozen=True)
class Tiling:
    """Groups of ``block`` consecutive output pixels of one output row x tiles of ``m_tile`` channels.

    Group g = (n, r, t) with t < per_row = ceil(Ow / block) covers pixels t*block .. t*block+block-1
    of output row r of image n; tile mo covers output channels mo*m_tile .. mo*m_tile+m_tile-1
    (channels >= M are computed on zero weights and never stored).
    """

    block: int
    m_tile: int
    split: str
    n_tiles: int
    per_row: int
    n_groups: int

    @property
    def padded_m(self) -> int:
        return self.n_tiles * self.m_tile


def default_m_tile(m: int) -> int:
    """The tile of M_TILES that wastes least on padding M, the larger on a tie."""
    return min(M_TILES, key=lambda t: (-(-m // t) * t, -t))


def tiling_defaults(spec: Conv2DSpec) -> dict:
    """m_tile by default_m_tile; block so that block * m_tile / 16 is about 16 accumulator registers."""
    m_tile = default_m_tile(spec.out_channels)
    block = max(1, min(8, 256 // m_tile, spec.out_w))
    return {"block": block, "m_tile": m_tile, "split": "tile_outer"}


def make_tiling(algorithm: str, spec: Conv2DSpec, knobs) -> Tiling:
    block, m_tile, split = knobs["block"], knobs["m_tile"], knobs["split"]
    for name, v in (("block", block), ("m_tile", m_tile)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise KnobError(f"{algorithm}: knob {name} must be a positive int, got {v!r}")
    if split not in SPLITS:
        raise KnobError(f"{algorithm}: knob split must be one of {SPLITS}, got {split!r}")
    per_row = -(-spec.out_w // block)
    return Tiling(int(block), int(m_tile), split, -(-spec.out_channels // m_tile), per_row,
                  spec.batch * spec.out_h * per_row)


def pad_m(w: np.ndarray, tl: Tiling) -> np.ndarray:
    """Zero-pad the last (output-channel) axis of a re-laid-out weight to whole m-tiles."""
    extra = tl.padded_m - w.shape[-1]
    return np.ascontiguousarray(np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, extra)]), dtype=np.float32)


def group_coords(spec: Conv2DSpec, tl: Tiling, g):
    """(n, r, first output pixel) of group g."""
    return g // (spec.out_h * tl.per_row), g // tl.per_row % spec.out_h, g % tl.per_row * tl.block


@T.macro
def for_each_tile(tl, tile):
    """Call tile(mo, g) for every (m-tile, group), split across threads by tl.split."""
    if tl.split == "tile_outer":
        for mo in range(tl.n_tiles):
            for g in T.parallel(tl.n_groups):
                tile(mo, g)
    elif tl.split == "fused":
        for f in T.parallel(tl.n_tiles * tl.n_groups):
            tile(f // tl.n_groups, f % tl.n_groups)
    else:
        for g in T.parallel(tl.n_groups):
            for mo in range(tl.n_tiles):
                tile(mo, g)


@T.macro
def zero_tile(acc, tl):
    for b in T.unroll(tl.block):
        for j in T.vectorized(tl.m_tile):
            acc[b, j] = T.float32(0)


@T.macro
def store_tile(y, acc, bias, spec, tl, ep, n, r, s0, m0):
    """y[n, m0 + j, r, s0 + b] = epilogue(acc[b, j]) for the pixels < Ow and channels < M.

    Fully unrolled so that acc stays in registers (a dynamic index would force it to memory).
    """
    for j in T.unroll(tl.m_tile):
        if spec.out_channels % tl.m_tile == 0 or m0 + j < spec.out_channels:
            for b in T.unroll(tl.block):
                if spec.out_w % tl.block == 0 or s0 + b < spec.out_w:
                    y[n, m0 + j, r, s0 + b] = epilogue_value(acc[b, j], m0 + j, bias, ep)


def any_nonzero(v, length: int):
    """TIR: v[0] != 0 or ... or v[length-1] != 0 (-0.0 is zero; NaN and Inf are non-zeros)."""
    zero = tvm.tirx.const(0.0, "float32")
    e = v[0] != zero
    for k in range(1, length):
        e = tvm.tirx.Or(e, v[k] != zero)
    return e


@T.macro
def two_pass_encode(rows, ptr, row_pass):
    """Count (row_pass(g, False) writes ptr[g + 1]), prefix sum, fill (row_pass(g, True))."""
    for g in T.parallel(rows):
        row_pass(g, False)
    ptr[0] = 0
    for g in range(rows):
        ptr[g + 1] = ptr[g + 1] + ptr[g]
    for g in T.parallel(rows):
        row_pass(g, True)


@T.macro
def emit_entry(ptr, idx, val, g, pos, index, v, width, fill):
    """One candidate entry of row g with values v[0:width]: counted (pos += any non-zero) or,
    when filling, written at pos if any value is non-zero. ptr[g + 1] gets the count."""
    if fill:
        if any_nonzero(v, width):
            idx[pos] = index
            for k in T.unroll(width):
                val[pos, k] = v[k]
            pos = pos + 1
    else:
        pos = pos + T.Cast("int32", any_nonzero(v, width))


def nonzero_count(ptr: np.ndarray) -> int:
    return int(np.asarray(ptr)[-1])


# --- im2csr --------------------------------------------------------------------------------
class Im2CSR(Algorithm):
    name = "im2csr"
    sparse = True

    def default_knobs(self, spec: Conv2DSpec) -> dict:
        return tiling_defaults(spec)

    def constants(self, spec, weight, bias, knobs):
        tl = make_tiling(self.name, spec, knobs)
        wr = weight.reshape(spec.out_channels, -1).T  # [C*Kh*Kw][M], rows k = (c*Kh + l)*Kw + q
        return {"w": pad_m(wr, tl), **bias_constant(spec, bias)}

    def stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs) -> list[Stage]:
        tl = make_tiling(self.name, spec, knobs)
        rows, cap = tl.n_groups + 1, tl.n_groups * spec.in_channels * spec.kernel_h * spec.kernel_w
        outs = (Buffer("csr_ptr", (rows,), "int32"), Buffer("csr_col", (cap,), "int32"),
                Buffer("csr_val", (cap, tl.block)))
        bias = ("bias",) if epilogue.bias else ()
        return [Stage("encode", "encode", prim(_encode_func(spec, tl, cap)), ("x",), outs),
                Stage("multiply", "multiply", prim(_multiply_func(spec, tl, cap, epilogue)),
                      ("csr_ptr", "csr_col", "csr_val", "w") + bias, (Buffer("y", spec.y_shape),))]

    def storage(self, spec, knobs, produced):
        return im2csr_storage(spec, knobs["block"], produced["csr_ptr"])

    def reference_storage(self, spec, knobs, x):
        return im2csr_storage(spec, knobs["block"], im2csr_encode(spec, x, knobs["block"])[0])

    def reference(self, spec, knobs, x, w):
        return im2csr_multiply(spec, knobs["block"], *im2csr_encode(spec, x, knobs["block"]), w)


def _encode_func(spec: Conv2DSpec, tl: Tiling, cap: int):
    N, C, H, W = spec.x_shape
    Kh, Kw, B = spec.kernel_h, spec.kernel_w, tl.block
    (sh, sw), (dh, dw), pt, pl = spec.stride, spec.dilation, spec.padding[0], spec.padding[1]
    Ow, rows = spec.out_w, tl.n_groups

    @T.macro
    def row_pass(x, ptr, col, val, g, fill):
        n, r, s0 = group_coords(spec, tl, g)
        pos: T.int32 = 0
        if fill:
            pos = ptr[g]
        for c, l in T.grid(C, Kh):
            i = r * sh + l * dh - pt
            if i >= 0 and i < H:
                for q in T.unroll(Kw):
                    v = T.alloc_local((B,), "float32")
                    for b in T.unroll(B):
                        j = (s0 + b) * sw + q * dw - pl
                        v[b] = T.if_then_else(j >= 0 and j < W and s0 + b < Ow,
                                              x[n, c, i, T.max(T.min(j, W - 1), 0)], T.float32(0))
                    emit_entry(ptr, col, val, g, pos, (c * Kh + l) * Kw + q, v, B, fill)
        if not fill:
            ptr[g + 1] = pos

    @T.prim_func
    def encode(x: T.Buffer((N, C, H, W), "float32"), ptr: T.Buffer((rows + 1,), "int32"),
               col: T.Buffer((cap,), "int32"), val: T.Buffer((cap, B), "float32")):
        two_pass_encode(rows, ptr, lambda g, fill: row_pass(x, ptr, col, val, g, fill))

    return encode


def _multiply_func(spec: Conv2DSpec, tl: Tiling, cap: int, ep: Epilogue):
    B, mt, K, Mp = tl.block, tl.m_tile, spec.in_channels * spec.kernel_h * spec.kernel_w, tl.padded_m
    rows = tl.n_groups

    @T.macro
    def tile(ptr, col, val, w, bias, y, mo, g):
        n, r, s0 = group_coords(spec, tl, g)
        acc = T.alloc_local((B, mt), "float32")
        zero_tile(acc, tl)
        for e in range(ptr[g], ptr[g + 1]):
            k = col[e]
            for b in T.unroll(B):
                for j in T.vectorized(mt):
                    acc[b, j] = acc[b, j] + val[e, b] * w[k, mo * mt + j]
        store_tile(y, acc, bias, spec, tl, ep, n, r, s0, mo * mt)

    if ep.bias:
        @T.prim_func
        def multiply(ptr: T.Buffer((rows + 1,), "int32"), col: T.Buffer((cap,), "int32"),
                     val: T.Buffer((cap, B), "float32"), w: T.Buffer((K, Mp), "float32"),
                     bias: T.Buffer((spec.out_channels,), "float32"), y: T.Buffer(spec.y_shape, "float32")):
            for_each_tile(tl, lambda mo, g: tile(ptr, col, val, w, bias, y, mo, g))
    else:
        @T.prim_func
        def multiply(ptr: T.Buffer((rows + 1,), "int32"), col: T.Buffer((cap,), "int32"),
                     val: T.Buffer((cap, B), "float32"), w: T.Buffer((K, Mp), "float32"),
                     y: T.Buffer(spec.y_shape, "float32")):
            for_each_tile(tl, lambda mo, g: tile(ptr, col, val, w, None, y, mo, g))
    return multiply


ALGORITHM = Im2CSR()
