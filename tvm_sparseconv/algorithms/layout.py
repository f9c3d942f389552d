"""The layout transforms as TIR: NCHW to channel blocks and back (layout.py names the layouts).

Specified in docs/algorithms.md section 16. The model rewrite (passes/rewrite_conv2d.py) calls
them where a tensor is needed in a layout it was not written in: at the model's edges, before
an op that needs NCHW, between two layers whose layouts differ. One task per (image, channel
block, row); a row of a block is W x cb floats, written (or read) contiguously. When cb and C
are multiples of the lanes and the row is at least one vector wide, lanes x lanes register
transposes move the data (lanes.Lanes.transpose), else element by element.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from ..cpu import CPU
from ..layout import NCHW, channel_block, layout_shape
from .base import Buffer, Stage, prim
from .lanes import Lanes, channels_last_block


def transform_stage(nchw_shape, src: str, dst: str, cpu: CPU) -> Stage:
    """The stage ``x`` (``nchw_shape`` held in ``src``) -> ``y`` (the same tensor in ``dst``),
    one of them "nchw" and the other blocked; named "to_<dst>"."""
    if (src == NCHW) == (dst == NCHW):
        raise ValueError(f"a layout transform goes between nchw and a blocked layout, not {src} -> {dst}")
    func = _pack(nchw_shape, channel_block(dst), cpu) if src == NCHW else _unpack(nchw_shape, channel_block(src), cpu)
    return Stage(f"to_{dst}", "encode", prim(func), ("x",), (Buffer("y", layout_shape(nchw_shape, dst)),))


def _fast(C: int, cb: int, W: int, lanes: int) -> bool:
    """Whole lanes x lanes tiles exist: cb and C multiples of the lanes, rows at least a vector."""
    return lanes > 1 and cb % lanes == 0 and C % lanes == 0 and W >= lanes


def _pack(nchw_shape, cb: int, cpu: CPU):
    """x (N x C x H x W) -> xb (N x ceil(C/cb) x H x W x cb), zeros past C."""
    N, C, H, W = nchw_shape
    NB = -(-C // cb)
    vec = Lanes(cpu)
    fast = _fast(C, cb, W, vec.n)

    @T.prim_func
    def pack(x: T.Buffer((N, C, H, W), "float32"), xb: T.Buffer((N, NB, H, W, cb), "float32")):
        for t in T.parallel(N * NB * H):
            if fast:
                # one block row, channels-last: W x cb contiguous floats (lanes.py, 11.3)
                row = T.decl_buffer((W * cb,), "float32", data=xb.data, elem_offset=t * (W * cb))
                channels_last_block(vec, row, x, t // (NB * H), t % H, t // H % NB, cb, C, W)
            else:
                for j, c in T.grid(W, cb):
                    xb[t // (NB * H), t // H % NB, t % H, j, c] = T.if_then_else(
                        t // H % NB * cb + c < C, x[t // (NB * H), T.min(t // H % NB * cb + c, C - 1), t % H, j],
                        T.float32(0))

    return pack


def _unpack(nchw_shape, cb: int, cpu: CPU):
    """xb (N x ceil(C/cb) x H x W x cb) -> x (N x C x H x W); the lanes past C are not read."""
    N, C, H, W = nchw_shape
    NB = -(-C // cb)
    vec = Lanes(cpu)
    L = vec.n
    fast = _fast(C, cb, W, L)

    @T.macro
    def tiles(xb, x, n, kb, h):
        """Per L channels and L pixels: L channel vectors of pixels, transposed into L pixel
        vectors of channels (the last pixel tile overlaps the one before it)."""
        for cv in range(cb // L):
            if kb * cb + cv * L < C:
                for jt in range(-(-W // L)):
                    _transpose_back(vec, xb, x, n, kb, h, T.min(jt * L, W - L), kb * cb + cv * L, cv * L)

    @T.prim_func
    def unpack(xb: T.Buffer((N, NB, H, W, cb), "float32"), x: T.Buffer((N, C, H, W), "float32")):
        for t in T.parallel(N * NB * H):
            if fast:
                tiles(xb, x, t // (NB * H), t // H % NB, t % H)
            else:
                for c, j in T.grid(cb, W):
                    if t // H % NB * cb + c < C:
                        x[t // (NB * H), t // H % NB * cb + c, t % H, j] = xb[t // (NB * H), t // H % NB, t % H, j, c]

    return unpack


def _transpose_back(vec: Lanes, xb, x, n, kb, h, j0, c0, dc) -> None:
    """x[n, c0 + i, h, j0 + j] = xb[n, kb, h, j0 + j, dc + i] for i, j < lanes (emitted through the
    IR builder from a macro: the transposed vectors are Python values, not a TIR loop)."""
    L = vec.n
    cols = vec.transpose([xb[n, kb, h, j0 + j, vec.ramp(dc)] for j in range(L)])
    for i in range(L):
        T.buffer_store(x, cols[i], [n, c0 + i, h, vec.ramp(j0)])
