"""im2csr: the CSR of the im2col matrix, built straight from the NCHW input, times dense weights.

Format (algorithms.md section 6), row-blocked by the knob ``block`` = B (B = 1 is plain im2CSR):
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

This module also holds the output-stationary pieces the halo algorithm shares (Tiling, the
tile loops, the epilogue store, the two-pass encoder skeleton).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import s_tir
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


def default_m_tile(m: int, tiles=M_TILES) -> int:
    """The tile of ``tiles`` that wastes least on padding M, the larger on a tie."""
    return min(tiles, key=lambda t: (-(-m // t) * t, -t))


def tiling_defaults(spec: Conv2DSpec, tiles=M_TILES) -> dict:
    """m_tile by default_m_tile; block so that block * m_tile / 16 is about 16 accumulator
    registers (at most 8 pixels), then the smallest block with as many groups per output row
    (Ow = 14: 7, not 8 with 2 pixels wasted); split "fused": with an even number of m-tiles,
    each of 2 threads gets every group of half the tiles (equal work, half the weights each)."""
    m_tile = default_m_tile(spec.out_channels, tiles)
    block = max(1, min(8, 256 // m_tile, spec.out_w))
    block = -(-spec.out_w // -(-spec.out_w // block))
    return {"block": block, "m_tile": m_tile, "split": "fused"}


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


def tile_weights(w: np.ndarray, tl: Tiling) -> np.ndarray:
    """[..., M] -> [n_tiles, ..., m_tile], M zero-padded to whole tiles.

    Tile-major, so that the weights one m-tile's groups read are one contiguous block
    (streamed once per tile, kept in L2) and rows read together are adjacent.
    """
    w = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, tl.padded_m - w.shape[-1])])
    w = w.reshape(w.shape[:-1] + (tl.n_tiles, tl.m_tile))
    return np.ascontiguousarray(np.moveaxis(w, -2, 0), dtype=np.float32)


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
    """TIR: some v[k], k < length, is a non-zero (NaN and Inf are, -0.0 is not).

    Tested on the bits: a float ``v != 0`` is an ordered compare in TIR, false for NaN.
    """
    bits = tvm.tirx.reinterpret("int32", v[0])
    for k in range(1, length):
        bits = bits | tvm.tirx.reinterpret("int32", v[k])
    return bits & 0x7FFFFFFF != 0


def root_block(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """func with its body in an opaque root block, as te.create_prim_func makes them.

    Relax's RewriteDataflowReshape asks every call_tir with one argument (an encoder of x)
    whether it is a reshape, and that analysis fails on a body that is not a block.
    """
    return func.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", func.body)))


@T.macro
def two_pass_encode(units, rows, ptr, unit_pass):
    """Count (unit_pass(u, False) writes ptr[g + 1] for its rows g), prefix sum over the rows,
    fill (unit_pass(u, True)); a parallel unit handles several consecutive pointer rows."""
    for u in T.parallel(units):
        unit_pass(u, False)
    ptr[0] = 0
    for g in range(rows):
        ptr[g + 1] = ptr[g + 1] + ptr[g]
    for u in T.parallel(units):
        unit_pass(u, True)


@T.macro
def emit_entry(ptr, idx, val, g, pos, p, index, v, width, fill):
    """One candidate entry (index, v[0:width]) of row g whose next slot is pos[p];
    pos[p] += 1 when any value is non-zero.

    The fill writes every candidate at pos[p] while it is < ptr[g + 1]: a candidate that is not
    stored is overwritten by the next stored one (there is one, as pos[p] < end), so there is no
    data-dependent branch, and nothing is written outside the row's own range [ptr[g], ptr[g+1]).
    """
    if fill:
        if pos[p] < ptr[g + 1]:
            idx[pos[p]] = index
            for k in T.unroll(width):
                val[pos[p], k] = v[k]
    pos[p] = pos[p] + T.Cast("int32", any_nonzero(v, width))


@T.macro
def start_rows(ptr, pos, g0, count, fill):
    """pos[t] = next slot of row g0 + t: its start when filling, a zero count when counting."""
    for t in range(count):
        if fill:
            pos[t] = ptr[g0 + t]
        else:
            pos[t] = 0


@T.macro
def finish_rows(ptr, pos, g0, count, fill):
    """After counting: ptr[g0 + t + 1] = the count of row g0 + t."""
    if not fill:
        for t in range(count):
            ptr[g0 + t + 1] = pos[t]


# --- im2csr --------------------------------------------------------------------------------
class Im2CSR(Algorithm):
    name = "im2csr"
    sparse = True

    def default_knobs(self, spec: Conv2DSpec) -> dict:
        return tiling_defaults(spec)

    def constants(self, spec, weight, bias, knobs):
        tl = make_tiling(self.name, spec, knobs)
        wr = weight.reshape(spec.out_channels, -1).T  # [C*Kh*Kw][M], rows k = (c*Kh + l)*Kw + q
        return {"w": tile_weights(wr, tl), **bias_constant(spec, bias)}

    def stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs) -> list[Stage]:
        tl = make_tiling(self.name, spec, knobs)
        cap = tl.n_groups * spec.in_channels * spec.kernel_h * spec.kernel_w
        outs = (Buffer("csr_ptr", (tl.n_groups + 1,), "int32"), Buffer("csr_col", (cap,), "int32"),
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
                        emit_entry(ptr, col, val, u * per_row + t, pos, t, (c * Kh + l) * Kw + q, v, B, fill)
        finish_rows(ptr, pos, u * per_row, per_row, fill)

    @T.prim_func
    def encode(x: T.Buffer((N, C, H, W), "float32"), ptr: T.Buffer((rows + 1,), "int32"),
               col: T.Buffer((cap,), "int32"), val: T.Buffer((cap, B), "float32")):
        two_pass_encode(N * spec.out_h, rows, ptr, lambda u, fill: row_pass(x, ptr, col, val, u, fill))

    return root_block(encode)


def _multiply_func(spec: Conv2DSpec, tl: Tiling, cap: int, ep: Epilogue):
    B, mt, K = tl.block, tl.m_tile, spec.in_channels * spec.kernel_h * spec.kernel_w
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
                    acc[b, j] = acc[b, j] + val[e, b] * w[mo, k, j]
        store_tile(y, acc, bias, spec, tl, ep, n, r, s0, mo * mt)

    if ep.bias:
        @T.prim_func
        def multiply(ptr: T.Buffer((rows + 1,), "int32"), col: T.Buffer((cap,), "int32"),
                     val: T.Buffer((cap, B), "float32"), w: T.Buffer((tl.n_tiles, K, mt), "float32"),
                     bias: T.Buffer((spec.out_channels,), "float32"), y: T.Buffer(spec.y_shape, "float32")):
            for_each_tile(tl, lambda mo, g: tile(ptr, col, val, w, bias, y, mo, g))
    else:
        @T.prim_func
        def multiply(ptr: T.Buffer((rows + 1,), "int32"), col: T.Buffer((cap,), "int32"),
                     val: T.Buffer((cap, B), "float32"), w: T.Buffer((tl.n_tiles, K, mt), "float32"),
                     y: T.Buffer(spec.y_shape, "float32")):
            for_each_tile(tl, lambda mo, g: tile(ptr, col, val, w, None, y, mo, g))
    return multiply


ALGORITHM = Im2CSR()
