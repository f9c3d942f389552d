"""pixcsr: each input pixel's non-zero channels, stored once; a direct convolution that skips every zero.

Specified in docs/algorithms.md section 8.

Format (reference/pixcsr.py states it exactly): channels in blocks of cb = the knob ``c_block``;
per (n, input row h, block kb, column j) a pointer range, per entry the code j*cb + (c - kb*cb)
and the value; only non-zeros of pixels some output pixel reads are stored:

    pix_ptr   (N*H*nkb*W + 1,)   int32    nkb = ceil(C / cb)
    pix_code  (N*C*H*W,)         int32    worst case: every element non-zero
    pix_val   (N*C*H*W,)         float32

The encoder is one TIR PrimFunc (count, prefix sum, fill, parallel over input rows); the fill
takes a vector of channels of a pixel at a time from a channels-last copy of each channel block
(lanes.channels_last_block) and writes them by compress stores.

The multiply is output-stationary and pixel-granular, so no zero is ever multiplied: per
(m-tile mo, R output rows of image n), for each (channel block kb, kernel row l) and each
output pixel, the m_tile accumulators live in registers while it walks the entries of the Kw
input pixels it reads in input row i = r*Sh + l*Dh - pt (one pointer range when Dw = 1: the Kw
pixels are adjacent), each doing acc[:] += v * w[mo, (kb, l, q, cc), :]. The weights
(re-laid-out at build time as [M/m_tile][nkb][Kh][Kw][cb][m_tile]) of one (kb, l) are
Kw*cb*m_tile floats: the default cb keeps them near 64 KB, read once from L2 for the R*Ow
pixels (R = the knob ``rows``) and then from L1; the partial sums wait in an R x Ow x m_tile
buffer. Each FMA loads its own weight vector (no reuse across pixels, unlike halo), which
halves the FMA rate, but no work is wasted on zeros: it wins at low density and on 1x1 and
strided layers, whose halo segments share little.

x is NCHW, or in channel blocks, and y (and the residual) too (knobs ``layout_in``,
``layout_out``; docs/algorithms.md section 16): the encoder's channels-last copy of a block is
then a plain copy, the store one vector of channels per pixel; the encoding is the same.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..cpu import CPU, cpu_of
from ..layout import NCHW_LAYOUTS, layout_of_block, layout_shape
from ..reference.pixcsr import pixcsr_blocks, pixcsr_encode, pixcsr_multiply, pixcsr_storage
from .base import (Algorithm, Buffer, KnobError, Stage, bias_constant, drop_unused, epilogue_inputs, grid, is_read,
                   knob_blocks, nonzero, prim, register)
from .lanes import Lanes, channels_last_block
from .tiling import default_m_tile, finish_rows, row_store, row_store_bias, start_rows, tile_weights, two_pass_encode

WEIGHT_BLOCK_FLOATS = 16384  # 64 KB of weights per (channel block, kernel row) by default
ROW_PIXELS = 112  # output pixels per task by default: a weight block read from L2 serves at least these
MIN_TASKS = 4  # parallel tasks per 2 cores at least, by default: no thread waits on one long tail task


def row_task_defaults(spec: Conv2DSpec, cpu: CPU, tiles) -> dict:
    """m_tile, c_block and rows of a kernel whose parallel tasks are (m-tile, image, R output
    rows) walking (channel block, kernel row) weight blocks: m_tile the largest of ``tiles``
    giving MIN_TASKS * cores / 2 tasks (else 16), c_block the power of two nearest WEIGHT_BLOCK_FLOATS /
    (Kw*m_tile) up to C, rows = ceil(ROW_PIXELS / Ow)."""
    rows = max(1, min(spec.out_h, -(-ROW_PIXELS // spec.out_w)))
    tasks = spec.batch * -(-spec.out_h // rows)
    least = max(MIN_TASKS, MIN_TASKS * cpu.cores // 2)
    tiles = tuple(t for t in tiles if -(-spec.out_channels // t) * tasks >= least) + (16,)
    m_tile = default_m_tile(spec.out_channels, tiles)
    cb = 2 ** round(math.log2(max(1.0, WEIGHT_BLOCK_FLOATS / (spec.kernel_w * m_tile))))
    return {"m_tile": m_tile, "c_block": min(cb, spec.in_channels), "rows": rows}


@register
class PixCSR(Algorithm):
    name = "pixcsr"
    sparse = True
    fuses_residual = True

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        """m_tile up to 8 vectors (8 accumulators; on AVX-512 128, 1x1 256->1024 at 14x14: 9 %
        faster than 64), the largest that still makes enough parallel tasks; c_block the power
        of two nearest WEIGHT_BLOCK_FLOATS / (Kw*m_tile), at most C; rows ceil(ROW_PIXELS / Ow)."""
        return {**row_task_defaults(spec, cpu, [t for t in (128, 64, 32) if t <= 8 * cpu.lanes]), **NCHW_LAYOUTS}

    def _checked(self, spec: Conv2DSpec, knobs) -> tuple[int, int, int, int, int]:
        """(m_tile, c_block, rows, x's channel block, y's channel block; 0: NCHW)."""
        for name in ("m_tile", "c_block", "rows"):
            v = knobs[name]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise KnobError(f"{self.name}: knob {name} must be a positive int, got {v!r}")
        return (int(knobs["m_tile"]), int(knobs["c_block"]), int(knobs["rows"]),
                *knob_blocks(self.name, knobs))

    def constants(self, spec, weight, bias, knobs):
        mt, cb, _, _, cbo = self._checked(spec, knobs)
        m, c, kh, kw = spec.w_shape
        nkb = pixcsr_blocks(spec, cb)
        wp = np.pad(weight.reshape(m, c, kh * kw), ((0, 0), (0, nkb * cb - c), (0, 0)))  # 0 for missing channels
        wr = wp.reshape(m, nkb, cb, kh * kw).transpose(1, 3, 2, 0).reshape(-1, m)  # rows (kb, l, q, cc)
        return {"w": tile_weights(wr, mt), **bias_constant(spec, bias, row_store_bias(spec, mt, cbo))}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        mt, cb, R, cbi, cbo = self._checked(spec, knobs)
        nkb = pixcsr_blocks(spec, cb)
        n, c, h, w = spec.x_shape
        ptr_rows, cap = n * h * nkb * w, n * c * h * w
        outs = (Buffer("pix_ptr", (ptr_rows + 1,), "int32"), Buffer("pix_code", (cap,), "int32"),
                Buffer("pix_val", (cap,)))
        encode = _encode_func(spec, Lanes(cpu_of(cpu)), cb, nkb, ptr_rows, cap, cbi)
        multiply = _multiply_func(spec, mt, cb, R, nkb, ptr_rows, cap, epilogue, cbo)
        return [Stage("encode", "encode", prim(encode), ("x",), outs),
                Stage("multiply", "multiply", prim(multiply), ("pix_ptr", "pix_code", "pix_val", "w")
                      + epilogue_inputs(epilogue), (Buffer("y", layout_shape(spec.y_shape, layout_of_block(cbo))),))]

    def storage(self, spec, knobs, produced):
        return pixcsr_storage(spec, produced["pix_ptr"])

    def reference_storage(self, spec, knobs, x):
        return pixcsr_storage(spec, pixcsr_encode(spec, x, knobs["c_block"])[0])

    def reference(self, spec, knobs, x, w):
        return pixcsr_multiply(spec, knobs["c_block"], *pixcsr_encode(spec, x, knobs["c_block"]), w)

    def knob_grid(self, spec, cpu):
        # weight blocks per kernel row of 16-256 KB (L1 to L2), tasks of 1-8 output rows
        for k in grid(m_tile=(32, 64, 128), c_block=(2, 4, 8, 16, 32, 64, 128, 256), rows=(1, 2, 4, 8)):
            cb = min(k["c_block"], spec.in_channels)
            if 4096 <= spec.kernel_w * cb * k["m_tile"] <= 65536 and k["rows"] <= spec.out_h and cb == k["c_block"] \
                    and k["m_tile"] <= 8 * cpu.lanes:
                yield k

def _encode_func(spec: Conv2DSpec, vec: Lanes, cb: int, nkb: int, ptr_rows: int, cap: int, cbi: int):
    N, C, H, W = spec.x_shape
    per = nkb * W  # pointer rows per input row
    n_groups, cw, L = -(-cb // vec.n), vec.block_width(cb), vec.n

    def selected(v, kb, g):
        """The lanes of v (channels kb*cb + g*L + lane) that are entries: non-zero channels
        of the block (an expression, not a variable, so that it stays in a mask register)."""
        return tvm.tirx.And(vec.nonzero(v), vec.block_lanes(C, cb, kb, g))

    @T.macro
    def row_pass(x, ptr, code, val, u, fill):
        """Input row u = (n, h): count per (block, column) along the contiguous rows of an NCHW
        x (vectorised), or fill block by block from a channels-last copy of the block, L
        channels of a pixel at a time by compress stores of the lanes the count pass counted
        (so each pointer row gets exactly its slots, and no branch depends on the data). A
        blocked x is counted as it is filled, by popcounts of the same vectors."""
        n, h = u // H, u % H
        if fill or cbi > 0:
            if not fill:  # rows of pixels no output reads count 0
                for k in range(per):
                    ptr[u * per + k + 1] = 0
            if is_read(spec, 0, h):
                xt = T.alloc_buffer((W * cw,), "float32")
                for kb in range(nkb):
                    channels_last_block(vec, xt, x, n, h, kb, cb, C, W, cbi)
                    for j in range(W):
                        if is_read(spec, 1, j):
                            pos = T.alloc_buffer((1,), "int32", scope="global")  # the row's next slot: a register
                            pos[0] = 0
                            if fill:
                                pos[0] = ptr[u * per + kb * W + j]
                            for g in range(n_groups):
                                v = xt[vec.ramp(j * cw + g * L)]
                                if fill:
                                    vec.compress_store(code, pos[0], vec.ramp(j * cb + g * L), selected(v, kb, g))
                                    vec.compress_store(val, pos[0], v, selected(v, kb, g))
                                pos[0] = pos[0] + vec.count(selected(v, kb, g))
                            if not fill:
                                ptr[u * per + kb * W + j + 1] = pos[0]
        else:
            pos = T.alloc_local((per,), "int32")
            start_rows(ptr, pos, u * per, per, fill)
            if is_read(spec, 0, h):
                for kb, cc in T.grid(nkb, cb):
                    if C % cb == 0 or kb * cb + cc < C:
                        for j in range(W):
                            if is_read(spec, 1, j):
                                pos[kb * W + j] = pos[kb * W + j] + T.Cast("int32", nonzero(x[n, kb * cb + cc, h, j]))
            finish_rows(ptr, pos, u * per, per, fill)

    @T.prim_func
    def encode(x: T.Buffer(layout_shape(spec.x_shape, layout_of_block(cbi)), "float32"),
               ptr: T.Buffer((ptr_rows + 1,), "int32"),
               code: T.Buffer((cap,), "int32"), val: T.Buffer((cap,), "float32")):
        two_pass_encode(N * H, ptr_rows, ptr, lambda u, fill: row_pass(x, ptr, code, val, u, fill))

    return encode


def _multiply_func(spec: Conv2DSpec, mt: int, cb: int, R: int, nkb: int, ptr_rows: int, cap: int,
                   ep: Epilogue, cbo: int):
    N, _, H, W = spec.x_shape
    M, Kh, Kw = spec.out_channels, spec.kernel_h, spec.kernel_w
    (sh, sw), (dh, dw), pt, pl = spec.stride, spec.dilation, spec.padding[0], spec.padding[1]
    Oh, Ow = spec.out_h, spec.out_w
    n_tiles, n_groups = -(-M // mt), -(-Oh // R)
    units = n_tiles * N * n_groups
    store = row_store(spec, mt, cbo)  # y through the epilogue, in y's layout

    @T.macro
    def fma(acc, val, w, mo, e, k):
        for j in T.vectorized(mt):
            acc[j] = acc[j] + val[e] * w[mo, k, j]

    @T.macro
    def tap_row(ptr, code, val, w, acc, mo, n, r, s, kb, l):
        """acc += the entries of block kb that output pixel (n, r, s) reads in kernel row l."""
        j0 = s * sw - pl  # column of kernel column 0
        i = r * sh + l * dh - pt
        if i >= 0 and i < H:
            row = ((n * H + i) * nkb + kb) * W
            wb = (kb * Kh + l) * Kw * cb
            if dw == 1:  # the Kw columns are adjacent: one range, q read back from the code
                lo = T.min(T.max(j0, 0), W)
                for e in range(ptr[row + lo], ptr[row + T.max(T.min(j0 + Kw, W), lo)]):
                    fma(acc, val, w, mo, e, wb + code[e] - j0 * cb)
            else:
                for q in T.unroll(Kw):
                    jq = j0 + q * dw
                    if jq >= 0 and jq < W:
                        for e in range(ptr[row + jq], ptr[row + jq + 1]):
                            fma(acc, val, w, mo, e, wb + q * cb + code[e] - jq * cb)

    @T.macro
    def out_rows(ptr, code, val, w, bias, res, y, f):
        """Output rows (n, r0 .. r0+R-1) for m-tile mo: partial sums per pixel, (channel block,
        kernel row) after (channel block, kernel row), whose Kw*cb weight vectors are read once
        for the R*Ow pixels, then y through the epilogue."""
        mo, n, r0 = f // (N * n_groups), f // n_groups % N, f % n_groups * R
        part = T.alloc_buffer((R, Ow, mt), "float32")
        for kb, l, rr, s in T.grid(nkb, Kh, R, Ow):
            if Oh % R == 0 or r0 + rr < Oh:
                acc = T.alloc_local((mt,), "float32")
                for j in T.vectorized(mt):
                    acc[j] = T.if_then_else(kb == 0 and l == 0, T.float32(0), part[rr, s, j])
                tap_row(ptr, code, val, w, acc, mo, n, r0 + rr, s, kb, l)
                for j in T.vectorized(mt):
                    part[rr, s, j] = acc[j]
        store(y, part, bias, res, ep, n, r0, R, mo * mt)

    wshape = (n_tiles, nkb * Kh * Kw * cb, mt)
    y_shape = layout_shape(spec.y_shape, layout_of_block(cbo))
    bias_len = row_store_bias(spec, mt, cbo)

    @T.prim_func
    def multiply(ptr: T.Buffer((ptr_rows + 1,), "int32"), code: T.Buffer((cap,), "int32"),
                 val: T.Buffer((cap,), "float32"), w: T.Buffer(wshape, "float32"),
                 bias: T.Buffer((bias_len,), "float32"), res: T.Buffer(y_shape, "float32"),
                 y: T.Buffer(y_shape, "float32")):
        for f in T.parallel(units):
            out_rows(ptr, code, val, w, bias, res, y, f)

    return drop_unused(multiply, ep)
