"""grouped: register-tiled grouped and depthwise convolution in TIR.

Specified in docs/algorithms.md section 15 (the activation layouts: section 16).

Layers with groups G > 1: depthwise (G = C, M = C*k for a channel multiplier k >= 1) and
grouped (1 < G < C). Output channel m reads the Cg = C/G input channels of its group
m // Mg (Mg = M/G). x N x C x H x W and y N x M x Oh x Ow are NCHW unless knobs ``layout_in``
and ``layout_out`` (layout.py) hold them in channel blocks (below). Two kernels (knob
``vector``, the axis the vector lanes run along), both output-stationary with the
accumulators in registers, each parallel task first packing the input rows its outputs read
into a scratch with the padding materialised (so that no tap is tested):

channels: tasks (n, channel block mb, band of ``rows`` output rows); xs Cg x Rin x Wp x cb,
    cb = ``c_block`` output channels (one vector of the CPU's lanes by default): lane j of
    xs[ci] holds the input channel that output channel mb*cb + j reads as its ci-th (lanes x
    lanes register transposes for depthwise layers without a multiplier, else element by
    element; 0 past M). Where cb divides Mg (RegNet's groups of 16 channels), every lane
    of block mb reads the same input channel, of group mb*cb // Mg: xs is then Cg x Rin x Wp
    scalars (``shares_group``), copied in vectors from NCHW rows, and the multiply broadcasts
    each (cb copies per element cost more than the convolution: 4-12x on RegNet-like 56x56
    layers). w n_mb x Cg x Kh x Kw x cb (OIHW re-laid-out once, channels past M zero). A
    register tile is ``tile_rows`` rows x ``block`` pixels x cb channels:
    acc[k, b, :] += xs[ci, i, j, :] * w[mb, ci, l, q, :], one weight vector per tap serving
    the tile's pixels; stored by register transposes as vectors of pixels per channel.
    Channel blocks (``blocks_layouts``: depthwise layers without a multiplier, and layers
    where cb divides Mg; the block cb = c_block): x N x ceil(C/cb) x H x W x cb. Depthwise,
    its block mb holds in lane j the channel lane j of xs holds, so a packed row is the
    block's row copied in vectors; where cb divides Mg, the group's blocks transpose in lanes
    x lanes tiles into its channels' scalar rows (element by element when Cg is not whole
    vectors or W < lanes). y (and the residual) N x ceil(M/cb) x Oh x Ow x cb, one
    accumulator vector stored per pixel, zeros past M.
width: tasks (n, group g, band); xs Cg x Rin x Sw x Wq, the group's input rows with zero
    borders, each row's padded columns split by phase (Wq = ceil(Wp/Sw): xs[ci, i, ph, j] is
    padded column j*Sw + ph; at stride 1 the row as it is); for each of its Mg output channels
    a register tile is ``tile_rows`` rows x ``block`` pixels in vectors along W:
    acc[k, p] += xs[ci, i, (q*Dw) % Sw, p + (q*Dw) // Sw] * w[m, ci, l, q] (a broadcast
    weight; w is the OIHW weight as given): contiguous loads at every stride, the strided
    reads once per input element, in the packing. NCHW only.

The epilogue (bias, residual, ReLU, clip) is applied in the store. Nothing is stored besides
y: the scratch is per task, Rin = (rows-1)*Sh + (Kh-1)*Dh + 1 rows, sized by the knobs and the
shape, not by the data. Knob defaults (default_tiling) follow from the CPU description.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue, UnsupportedConvError
from ..cpu import CPU, cpu_of
from ..layout import NCHW, lanes_layout, layout_of_block, layout_shape
from ..reference import dense_conv2d
from ..reference.storage import Storage
from .base import (Algorithm, Buffer, KnobError, Stage, balanced, bias_constant, blocked_value, drop_unused,
                   epilogue_inputs, grid, knob_blocks, prim, register, registers_ok, spread, store_output)
from .lanes import Lanes

VECTORS = ("channels", "width")  # the axis the vector lanes run along: output channels, or output pixels of a row
MIN_TASKS_PER_CORE = 4  # parallel tasks per core at least, by default: no thread waits on one long tail task
MAX_BLOCK = {"channels": 32, "width": 128}  # pixels of a row per register tile


@dataclass(frozen=True)
class GroupedTiling:
    vector: str     # one of VECTORS
    c_block: int    # channels: output channels per block (whole vectors of the CPU: transposed stores); width: unused
    block: int      # output pixels of one row per register tile (capped at Ow)
    tile_rows: int  # output rows per register tile (capped at Oh)
    rows: int       # output rows per parallel task (capped at Oh)
    cb_in: int = 0  # channel block of x (layout.channel_block: 0 for NCHW; else c_block)
    cb_out: int = 0  # channel block of y and the residual (0 for NCHW; else c_block)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _per_group(spec: Conv2DSpec) -> tuple[int, int]:
    """(Cg, Mg): input and output channels per group."""
    return spec.in_channels // spec.groups, spec.out_channels // spec.groups


def shares_group(spec: Conv2DSpec, cb: int) -> bool:
    """Every block of ``cb`` output channels lies in one group (cb divides Mg): the block's
    lanes all read the same input channel per ci, so the channels kernel packs the group's
    rows once, as scalars, and broadcasts each into the lanes (instead of cb copies)."""
    return _per_group(spec)[1] % cb == 0


def blocks_layouts(spec: Conv2DSpec, cb: int) -> bool:
    """The channels kernel in blocks of ``cb`` can read and write channel blocks: a depthwise
    layer without a multiplier (groups = C = M), where lane j of packed block mb is input
    channel mb*cb + j, exactly the lane a blocked x holds it in and a blocked y wants it back
    in; or a layer whose blocks each lie in one group (shares_group), whose packed rows are
    scalars read from wherever x holds the channel."""
    return _per_group(spec) == (1, 1) or shares_group(spec, cb)


def rows_in(spec: Conv2DSpec, rows: int) -> int:
    """Padded input rows that ``rows`` consecutive output rows read."""
    return (rows - 1) * spec.stride[0] + (spec.kernel_h - 1) * spec.dilation[0] + 1


def phase_width(spec: Conv2DSpec) -> int:
    """Wq: the columns of one phase of a packed row of the width kernel, ceil(Wp / Sw)."""
    return _cdiv(spec.padded_w, spec.stride[1])


def scratch_floats(spec: Conv2DSpec, vector: str, c_block: int, rows: int) -> int:
    """float32 elements of one task's packed input: Cg x Rin x Wp, x c_block for channels
    unless the block lies in one group (shares_group: scalars); Cg x Rin x Sw x Wq for width."""
    if vector == "width":
        return _per_group(spec)[0] * rows_in(spec, rows) * spec.stride[1] * phase_width(spec)
    lanes = c_block if not shares_group(spec, c_block) else 1
    return _per_group(spec)[0] * rows_in(spec, rows) * spec.padded_w * lanes


def default_rows(spec: Conv2DSpec, cpu: CPU, vector: str, c_block: int, tile_rows: int) -> int:
    """Output rows per task: the rows cut into as few bands as keep MIN_TASKS_PER_CORE tasks
    per core and one task's scratch within half the L2 (bands of equal height; a multiple of
    tile_rows when that makes no more bands)."""
    oh = spec.out_h
    units = spec.batch * (_cdiv(spec.out_channels, c_block) if vector == "channels" else spec.groups)
    bands = min(oh, max(1, _cdiv(MIN_TASKS_PER_CORE * cpu.cores, units)))
    while bands < oh and 4 * scratch_floats(spec, vector, c_block, _cdiv(oh, bands)) > cpu.l2 // 2:
        bands += 1
    rows = _cdiv(oh, bands)
    whole = min(_cdiv(rows, tile_rows) * tile_rows, oh)
    fits = 4 * scratch_floats(spec, vector, c_block, whole) <= cpu.l2 // 2
    return whole if _cdiv(oh, whole) == _cdiv(oh, rows) and fits else rows


def default_tiling(spec: Conv2DSpec, cpu: CPU, vector: str | None = None) -> dict:
    """Knob defaults by layer shape and CPU (docs/algorithms.md 15.4): one accumulator register
    per (pixel, vector), cpu.accumulators of them.

    - the kernel: width where the channels kernel would copy each input element into the lanes
      of every output channel that reads it (blocks_layouts is false: grouped layers whose
      blocks span groups, depthwise layers with a multiplier) and the output row fills a vector;
      else channels (measured: width 1.2-7x faster on such layers at 28x28 and wider, channels
      1.2-1.7x at 14x14 and 7x7 and 2.5-3x where a block lies in one group; the table in
      docs/algorithms.md 15.4);
    - channels: c_block one vector of the CPU's lanes; block up to
      cpu.accumulators pixels, balanced over the row; tile_rows as many rows as the rest of
      the accumulators hold (Ow = 7 on AVX-512: 2 x 7);
    - width: block up to cpu.accumulators/2 vectors along the row, balanced over it;
      tile_rows as many rows as the rest of cpu.accumulators/2 hold (Ow = 56 on AVX-512: 2 rows
      x 4 vectors). Half the budget: the rows of a tile read overlapping input rows, whose
      loads LLVM keeps live across the tile (4 x 4 vectors spilled on AVX-512);
    - rows by default_rows (then tile_rows at most rows: parallel tasks come first).
    """
    oh, ow, v, acc = spec.out_h, spec.out_w, cpu.lanes, cpu.accumulators
    vector = vector or ("width" if not blocks_layouts(spec, v) and ow >= v else "channels")
    if vector == "channels":
        block = balanced(min(acc, ow), ow)
        tile_rows = min(oh, max(1, acc // block))
    else:
        vectors = _cdiv(ow, v)
        per_tile = balanced(min(acc // 2, vectors), vectors)
        block, tile_rows = min(per_tile * v, ow), min(oh, max(1, acc // 2 // per_tile))
    rows = default_rows(spec, cpu, vector, v, tile_rows)
    return {"vector": vector, "c_block": v, "block": block, "tile_rows": min(tile_rows, rows), "rows": rows,
            "layout_in": NCHW, "layout_out": NCHW}


def make_tiling(spec: Conv2DSpec, knobs) -> GroupedTiling:
    vector = knobs["vector"]
    if vector not in VECTORS:
        raise KnobError(f"grouped: vector must be one of {VECTORS}, got {vector!r}")
    most = {"c_block": 64, "block": MAX_BLOCK[vector], "tile_rows": 16, "rows": None}
    for name, top in most.items():
        v = knobs[name]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 or (top and v > top):
            raise KnobError(f"grouped: knob {name} must be {f'an int in 1..{top}' if top else 'a positive int'}, "
                            f"got {v!r}")
    cb_in, cb_out = knob_blocks("grouped", knobs)
    if cb_in or cb_out:
        if vector != "channels":
            raise KnobError("grouped: blocked layouts (layout_in, layout_out) need vector='channels' "
                            f"(the width kernel reads and writes NCHW), got vector={vector!r}")
        if not blocks_layouts(spec, int(knobs["c_block"])):
            raise KnobError(f"grouped: blocked layouts (layout_in, layout_out) are for depthwise layers without a "
                            f"channel multiplier (groups = C = M) and layers whose c_block divides the output "
                            f"channels per group, not C={spec.in_channels}, M={spec.out_channels}, "
                            f"groups={spec.groups}, c_block={knobs['c_block']!r}")
        for knob, cb in (("layout_in", cb_in), ("layout_out", cb_out)):
            if cb and cb != knobs["c_block"]:
                raise KnobError(f"grouped: {knob}={knobs[knob]!r} needs c_block={cb} (the lanes of a packed block "
                                f"are the layout's block), got c_block={knobs['c_block']!r}")
    return GroupedTiling(vector, int(knobs["c_block"]), min(int(knobs["block"]), spec.out_w),
                         min(int(knobs["tile_rows"]), spec.out_h), min(int(knobs["rows"]), spec.out_h), cb_in, cb_out)


def block_weights(spec: Conv2DSpec, w: np.ndarray, cb: int) -> np.ndarray:
    """OIHW (M x Cg x Kh x Kw) -> n_mb x Cg x Kh x Kw x cb, output channels past M zero."""
    n_mb = _cdiv(spec.out_channels, cb)
    wp = np.zeros((n_mb * cb,) + w.shape[1:], np.float32)
    wp[:spec.out_channels] = w
    return np.ascontiguousarray(wp.reshape(n_mb, cb, *w.shape[1:]).transpose(0, 2, 3, 4, 1))


def _each(width: int, step: int, emit) -> None:
    """emit(offset, length) for each piece of ``width`` in steps of ``step``, the last shorter
    (a Python loop while a macro is parsed: each piece is its own statement)."""
    for off in range(0, width, step):
        emit(off, min(step, width - off))


@T.macro
def _loop_pieces(width: int, step: int, emit):
    """emit(offset, length) for each piece of ``width`` in steps of ``step``: a loop over the
    whole ones, then the shorter last one (two copies of emit's code, not one per piece)."""
    for g in range(width // step):
        emit(g * step, step)
    if width % step > 0:
        emit(width // step * step, width % step)


def _phases(W: int, pl: int, sw: int, Wq: int, zero, copy) -> None:
    """A packed row of the width kernel, phase by phase (a Python loop while a macro is parsed):
    phase ph holds padded columns j*sw + ph, j < Wq; zero(off, count) where they are padding,
    copy(off, count, col) for the ``count`` of them in x from its column ``col`` on."""
    for ph in range(sw):
        lo = min(Wq, _cdiv(max(pl - ph, 0), sw))  # the first j whose column is in x
        hi = max(lo, min(Wq, _cdiv(W + pl - ph, sw)))  # past the last
        zero(ph * Wq, lo)
        copy(ph * Wq + lo, hi - lo, lo * sw + ph - pl)
        zero(ph * Wq + hi, Wq - hi)


@T.macro
def _copy_strided(x, xs, n, c, h, base, col, step, off, ln):
    """xs[base + off + j] = x[n, c, h, col + (off + j) * step] for j < ln (a vector copy of a
    row's piece; a strided load at step > 1)."""
    for j in T.vectorized(ln):
        xs[base + off + j] = x[n, c, h, col + (off + j) * step]


@T.macro
def _zero(xs, base, count):
    """xs[base : base + count] = 0 (the padding of a packed row)."""
    for j in range(count):
        xs[base + j] = T.float32(0)


@T.macro
def _task_rows(R: int, TR: int, Oh: int, r0, tile):
    """tile(rr, rows) for the output rows r0 .. r0+R-1 below Oh (rr: the first, relative to r0):
    tiles of TR rows, then single rows for the rest."""
    if Oh % R == 0:
        for rt in range(R // TR):
            tile(rt * TR, TR)
        if R % TR > 0:
            for rr in range(R // TR * TR, R):
                tile(rr, 1)
    else:  # the last task has fewer rows
        for rt in range(T.min(R, Oh - r0) // TR):
            tile(rt * TR, TR)
        if TR > 1:
            for rr in range(T.min(R, Oh - r0) // TR * TR, T.min(R, Oh - r0)):
                tile(rr, 1)


def _channels_func(spec: Conv2DSpec, tl: GroupedTiling, cpu: CPU, ep: Epilogue):
    """The multiply PrimFunc of the channels kernel (vector lanes across output channels)."""
    N, C, H, W = spec.x_shape
    M, Kh, Kw, Oh, Ow = spec.out_channels, spec.kernel_h, spec.kernel_w, spec.out_h, spec.out_w
    (sh, sw), (dh, dw), pt, pl = spec.stride, spec.dilation, spec.padding[0], spec.padding[1]
    Cg, Mg = _per_group(spec)
    Wp, cb, B, TR, R = spec.padded_w, tl.c_block, tl.block, tl.tile_rows, tl.rows
    Rin, n_mb, bands = rows_in(spec, R), _cdiv(M, cb), _cdiv(Oh, R)
    vec = Lanes(cpu)
    L = vec.n
    whole = cb % L == 0  # the block is whole vectors: transposed in registers
    # depthwise without a multiplier: lane j of block mb is input channel mb*cb + j, so whole
    # L x L tiles of x transpose into the packed rows
    transposes = Cg == 1 and Mg == 1 and whole and W >= L
    m_whole = M % cb == 0
    blocked_in, blocked_out = tl.cb_in > 0, tl.cb_out > 0  # x, y in blocks (blocks_layouts)
    shared = shares_group(spec, cb)  # xs holds scalars of the block's group, broadcast into the lanes
    lw = 1 if shared else cb  # floats per packed element
    # a shared block's group from a blocked x in whole L x L tiles: the group's blocks of L
    # channels transpose into L packed rows
    untransposes = shared and tl.cb_in == L and Cg % L == 0 and W >= L

    def xs_at(xs, at, j):
        """Packed element ``at`` (ci, row, column flattened) in lane j."""
        return xs[at] if shared else xs[at * cb + j]

    @T.macro
    def pack_lanes(x, xs, n, mb, ci, h, base):
        """One input row h: xs[base + (pl + j)*cb + lane] = x[n, channel of (mb*cb + lane, ci), h, j]."""
        for lane in range(cb):
            if m_whole or mb * cb + lane < M:  # (an `if True:` vanishes when the TVMScript is parsed)
                for j in range(W):
                    xs[base + (pl + j) * cb + lane] = x[n, (mb * cb + lane) // Mg * Cg + ci, h, j]
            else:
                for j in range(W):
                    xs[base + (pl + j) * cb + lane] = T.float32(0)

    @T.macro
    def pack_transposed(x, xs, n, mb, h, base):
        for g in range(cb // L):
            if C % L == 0 or mb * cb + g * L + L <= C:  # whole tiles of channels
                for jt in range(_cdiv(W, L)):  # the last column tile overlaps the one before it
                    vec.transpose_tile(xs, cb, x, n, mb * cb + g * L, h, T.min(jt * L, W - L), base + pl * cb + g * L)
            else:
                for lane in range(L):
                    for j in range(W):
                        xs[base + (pl + j) * cb + g * L + lane] = T.if_then_else(
                            mb * cb + g * L + lane < C, x[n, T.min(mb * cb + g * L + lane, C - 1), h, j], T.float32(0))

    @T.macro
    def pack_blocked(x, xs, n, mb, h, base):
        """One input row h of block mb of a blocked x (W x cb contiguous floats) copied as it is:
        lane j is channel mb*cb + j in both. Lanes past C, which a writer may have left non-zero
        (layout.py), feed only the output channels past M, which store_row drops."""
        for j in range(W):
            for lane in T.vectorized(cb):
                xs[base + (pl + j) * cb + lane] = x[n, mb, h, j, lane]

    @T.macro
    def borders(xs, base):
        """The padding columns of the packed row at ``base``: zeros."""
        _zero(xs, base, pl * lw)
        _zero(xs, base + (pl + W) * lw, (Wp - pl - W) * lw)

    @T.macro
    def pack_shared(x, xs, n, mb, ci, h, base):
        """One input row h of input channel c, the ci-th of block mb's group, as scalars:
        xs[base + pl + j] = x[n, c, h, j] (x NCHW: vector copies; blocked: lane c % cb_in)."""
        c = mb * cb // Mg * Cg + ci
        if blocked_in:
            for j in range(W):
                xs[base + pl + j] = x[n, c // tl.cb_in, h, j, c % tl.cb_in]
        else:
            _loop_pieces(W, L, lambda off, ln: _copy_strided(x, xs, n, c, h, base + pl, 0, 1, off, ln))

    @T.macro
    def pack_untransposed(x, xs, n, mb, r0):
        """As pack (shared, from a blocked x): per input row, the group's Cg/L channel blocks
        transposed in L x L tiles into their channels' packed rows."""
        for ii in range(Rin):
            h = r0 * sh + ii - pt
            if h >= 0 and h < H:
                for ci in range(Cg):
                    borders(xs, (ci * Rin + ii) * Wp)
                for kb in range(Cg // L):
                    for jt in range(_cdiv(W, L)):  # the last column tile overlaps the one before it
                        j0 = T.min(jt * L, W - L)
                        vec.untranspose_tile(xs, Rin * Wp, x, n, mb * cb // Mg * Cg // L + kb, h, j0,
                                             (kb * L * Rin + ii) * Wp + pl + j0)
            else:
                for ci in range(Cg):
                    _zero(xs, (ci * Rin + ii) * Wp, Wp)

    @T.macro
    def pack(x, xs, n, mb, r0):
        """xs[ci, ii, jj(, lane)] = padded input row r0*sh + ii, column jj of the channel output
        lane mb*cb + lane reads as its ci-th (one for all lanes when shared); 0 in the padding
        and past M."""
        for ci, ii in T.grid(Cg, Rin):
            base = (ci * Rin + ii) * Wp * lw
            h = r0 * sh + ii - pt
            if h >= 0 and h < H:
                borders(xs, base)
                if shared:
                    pack_shared(x, xs, n, mb, ci, h, base)
                elif blocked_in:
                    pack_blocked(x, xs, n, mb, h, base)
                elif transposes:
                    pack_transposed(x, xs, n, mb, h, base)
                else:
                    pack_lanes(x, xs, n, mb, ci, h, base)
            else:
                _zero(xs, base, Wp * lw)

    def store_transposed(y, acc, bias, res, n, mb, r, k, w0, BT):
        """Row k of the tile: L x L register transposes turn the accumulators (a vector of L
        channels per pixel) into vectors of pixels per channel, each stored in one piece to y
        through the epilogue (emitted while the macro is parsed)."""
        for g in range(cb // L):
            for p0 in range(0, BT, L):
                px = min(L, BT - p0)
                cols = vec.transpose([acc[k, p0 + i, vec.ramp(g * L)] if i < px else vec.bcast(0.0, "float32")
                                      for i in range(L)])
                for j in range(L):
                    m = mb * cb + g * L + j
                    v = cols[j] if px == L else tvm.tirx.Shuffle([cols[j]], list(range(px)))
                    at = (n, m, r, tvm.tirx.Ramp(w0 + p0, 1, px) if px > 1 else w0 + p0)
                    if m_whole:
                        store_output(y, at, v, bias, res, ep)
                    else:
                        with T.If(m < M):
                            with T.Then():
                                store_output(y, at, v, bias, res, ep)

    @T.macro
    def store_blocked(y, acc, bias, res, n, mb, r, k, w0, BT):
        """Row k of the tile to a blocked y: per pixel one vector of the block's cb channels,
        where y holds them (0 past M: the layout's promise)."""
        for b in T.unroll(BT):
            for j in T.vectorized(cb):
                y[n, mb, r, w0 + b, j] = blocked_value(acc[k, b, j], mb * cb + j, bias, ep, res,
                                                       (n, mb, r, w0 + b, j), M, not m_whole)

    @T.macro
    def store_row(y, acc, bias, res, n, mb, r, k, w0, BT):
        if blocked_out:
            store_blocked(y, acc, bias, res, n, mb, r, k, w0, BT)
        elif whole:
            store_transposed(y, acc, bias, res, n, mb, r, k, w0, BT)
        else:  # a vector of BT pixels per output channel, gathered from the accumulators
            for j in T.unroll(cb):
                if m_whole or mb * cb + j < M:
                    for b in T.vectorized(BT):
                        store_output(y, (n, mb * cb + j, r, w0 + b), acc[k, b, j], bias, res, ep)

    @T.macro
    def tile(xs, w, bias, res, y, acc, n, mb, r0, rr, TRT, w0, BT):
        """Output rows r0+rr .. +TRT-1, pixels w0 .. w0+BT-1, channels mb*cb .. +cb-1."""
        for k in T.unroll(TRT):
            for b in T.unroll(BT):
                for j in T.vectorized(cb):
                    acc[k, b, j] = T.float32(0)
        for ci in range(Cg):
            for l in T.unroll(Kh):
                for q in T.unroll(Kw):
                    for k in T.unroll(TRT):
                        for b in T.unroll(BT):
                            for j in T.vectorized(cb):
                                acc[k, b, j] = acc[k, b, j] + xs_at(
                                    xs, (ci * Rin + (rr + k) * sh + l * dh) * Wp + (w0 + b) * sw + q * dw, j) \
                                    * w[mb, ci, l, q, j]
        for k in T.unroll(TRT):
            store_row(y, acc, bias, res, n, mb, r0 + rr + k, k, w0, BT)

    @T.macro
    def body(x, w, bias, res, y):
        for t in T.parallel(N * n_mb * bands):
            n, mb, r0 = t // (n_mb * bands), t // bands % n_mb, t % bands * R
            xs = T.alloc_buffer((Cg * Rin * Wp * lw,), "float32")
            acc = T.alloc_local((TR, B, cb), "float32")
            if untransposes:
                pack_untransposed(x, xs, n, mb, r0)
            else:
                pack(x, xs, n, mb, r0)
            _task_rows(R, TR, Oh, r0, lambda rr, rows: _loop_pieces(
                Ow, B, lambda w0, bt: tile(xs, w, bias, res, y, acc, n, mb, r0, rr, rows, w0, bt)))

    return _multiply_prim(spec, tl, ep, (n_mb, Cg, Kh, Kw, cb), body)


def _width_func(spec: Conv2DSpec, tl: GroupedTiling, cpu: CPU, ep: Epilogue):
    """The multiply PrimFunc of the width kernel (vector lanes along the output row)."""
    N, C, H, W = spec.x_shape
    M, Kh, Kw, Oh, Ow = spec.out_channels, spec.kernel_h, spec.kernel_w, spec.out_h, spec.out_w
    (sh, sw), (dh, dw), pt, pl = spec.stride, spec.dilation, spec.padding[0], spec.padding[1]
    Cg, Mg = _per_group(spec)
    B, TR, R, L = tl.block, tl.tile_rows, tl.rows, cpu.lanes
    Wq = phase_width(spec)
    Wr = sw * Wq  # a packed row: its Sw phases one after the other
    Rin, bands = rows_in(spec, R), _cdiv(Oh, R)

    @T.macro
    def pack(x, xs, n, g, r0):
        """xs[ci, ii, ph, j] = padded row r0*sh + ii, column j*sw + ph of input channel g*Cg + ci."""
        for ci, ii in T.grid(Cg, Rin):
            base = (ci * Rin + ii) * Wr
            h = r0 * sh + ii - pt
            if h >= 0 and h < H:
                _phases(W, pl, sw, Wq, lambda off, count: _zero(xs, base + off, count),
                        lambda off, count, col: _loop_pieces(count, L, lambda o, ln: _copy_strided(
                            x, xs, n, g * Cg + ci, h, base + off, col, sw, o, ln)))
            else:
                _zero(xs, base, Wr)

    @T.macro
    def zero_piece(acc, k, off, ln):
        for p in T.vectorized(ln):
            acc[k, off + p] = T.float32(0)

    @T.macro
    def fma_piece(xs, w, acc, m, ci, rr, k, l, q, w0, off, ln):
        for p in T.vectorized(ln):
            acc[k, off + p] = acc[k, off + p] + xs[(ci * Rin + (rr + k) * sh + l * dh) * Wr + q * dw % sw * Wq
                                                   + w0 + off + p + q * dw // sw] * w[m, ci, l, q]

    @T.macro
    def store_piece(y, acc, bias, res, n, m, r, k, w0, off, ln):
        for p in T.vectorized(ln):
            store_output(y, (n, m, r, w0 + off + p), acc[k, off + p], bias, res, ep)

    @T.macro
    def tile(xs, w, bias, res, y, acc, n, m, r0, rr, TRT, w0, BT):
        """Output rows r0+rr .. +TRT-1, pixels w0 .. w0+BT-1 of output channel m."""
        for k in T.unroll(TRT):
            _each(BT, L, lambda off, ln: zero_piece(acc, k, off, ln))
        for ci in range(Cg):
            for l in T.unroll(Kh):
                for q in T.unroll(Kw):
                    for k in T.unroll(TRT):
                        _each(BT, L, lambda off, ln: fma_piece(xs, w, acc, m, ci, rr, k, l, q, w0, off, ln))
        for k in T.unroll(TRT):
            _each(BT, L, lambda off, ln: store_piece(y, acc, bias, res, n, m, r0 + rr + k, k, w0, off, ln))

    @T.macro
    def body(x, w, bias, res, y):
        for t in T.parallel(N * spec.groups * bands):
            n, g, r0 = t // (spec.groups * bands), t // bands % spec.groups, t % bands * R
            xs = T.alloc_buffer((Cg * Rin * Wr,), "float32")
            acc = T.alloc_local((TR, B), "float32")
            pack(x, xs, n, g, r0)
            for mg in range(Mg):
                _task_rows(R, TR, Oh, r0, lambda rr, rows: _loop_pieces(
                    Ow, B, lambda w0, bt: tile(xs, w, bias, res, y, acc, n, g * Mg + mg, r0, rr, rows, w0, bt)))

    return _multiply_prim(spec, tl, ep, spec.w_shape, body)


def _bias_len(spec: Conv2DSpec, tl: GroupedTiling) -> int:
    """M, or whole blocks of M when y is blocked (the lanes past M read bias 0)."""
    return _cdiv(spec.out_channels, tl.cb_out) * tl.cb_out if tl.cb_out else spec.out_channels


def _multiply_prim(spec: Conv2DSpec, tl: GroupedTiling, ep: Epilogue, w_shape, body):
    """multiply(x, w[, bias][, res], y) whose body is the macro ``body(x, w, bias, res, y)``; x in
    layout_in, y and res in layout_out (layout.layout_shape), bias _bias_len long."""
    x_shape = layout_shape(spec.x_shape, layout_of_block(tl.cb_in))
    y_shape = layout_shape(spec.y_shape, layout_of_block(tl.cb_out))
    bias_len = _bias_len(spec, tl)

    @T.prim_func
    def multiply(x: T.Buffer(x_shape, "float32"), w: T.Buffer(w_shape, "float32"),
                 bias: T.Buffer((bias_len,), "float32"),
                 res: T.Buffer(y_shape, "float32"), y: T.Buffer(y_shape, "float32")):
        body(x, w, bias, res, y)

    return drop_unused(multiply, ep)


@register
class Grouped(Algorithm):
    name = "grouped"
    sparse = False
    fuses_residual = True
    groups = True
    kernel_knob = "vector"

    def check(self, spec: Conv2DSpec) -> None:
        if spec.groups == 1:
            raise UnsupportedConvError(f"{self.name} computes grouped and depthwise convs only "
                                       f"(groups > 1), not groups=1")

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        return default_tiling(spec, cpu)

    def knobs(self, spec: Conv2DSpec, knobs=None, cpu=None) -> dict:
        """As Algorithm.knobs, with the defaults of the kernel asked for (tile sizes differ)."""
        knobs = dict(knobs or {})
        out = default_tiling(spec, cpu_of(cpu), knobs.get("vector"))
        unknown = sorted(set(knobs) - set(out))
        if unknown:
            raise KnobError(f"{self.name} has no knob {unknown[0]!r} (knobs: {sorted(out)})")
        return {**out, **knobs}

    def constants(self, spec, weight, bias, knobs):
        tl = make_tiling(spec, knobs)
        w = block_weights(spec, weight, tl.c_block) if tl.vector == "channels" else np.asarray(weight, np.float32)
        return {"w": w, **bias_constant(spec, bias, _bias_len(spec, tl))}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        self.check(spec)
        tl, cpu = make_tiling(spec, knobs), cpu_of(cpu)
        make = _channels_func if tl.vector == "channels" else _width_func
        y_shape = layout_shape(spec.y_shape, layout_of_block(tl.cb_out))
        return [Stage("multiply", "multiply", prim(make(spec, tl, cpu, epilogue)),
                      ("x", "w") + epilogue_inputs(epilogue), (Buffer("y", y_shape),))]

    def storage(self, spec, knobs, produced):
        return Storage(0, 0)  # the packed rows are a per-task scratch, not a stored format

    def reference_storage(self, spec, knobs, x):
        return Storage(0, 0)

    def reference(self, spec, knobs, x, w):
        return dense_conv2d(spec, x, w)

    def knob_space(self, spec: Conv2DSpec, cpu=None) -> list[dict]:
        """As Algorithm.knob_space, the candidates in NCHW first, in the order they have without
        the blocked ones (the tuner's selection measures a prefix of those: the blocks do not
        move it), then those with blocks, spread the same way."""
        cpu = cpu_of(cpu)
        cands = list(self.knob_grid(spec, cpu))
        nchw = [k for k in cands if self.layouts(spec, k) == (NCHW, NCHW)]
        blocks = [k for k in cands if self.layouts(spec, k) != (NCHW, NCHW)]
        return spread(self.valid_knobs(spec, cpu, [{}] + nchw)) + spread(self.valid_knobs(spec, cpu, blocks), False)

    def knob_grid(self, spec, cpu):
        """The tiles below in NCHW; for a depthwise layer without a multiplier, the channels
        kernel's tiles of one vector also with x and y each in NCHW or in blocks of the CPU's
        lanes (the block is c_block: make_tiling). No block of two vectors where it would span
        two groups and one vector would not: each input element would then be copied into the
        lanes of every output that reads it (shares_group), which took 1.5x (stride 1) to 11x
        (stride 2) the one-vector block's time on groups of 16 channels."""
        ow, oh, v = spec.out_w, spec.out_h, cpu.lanes
        c_blocks = (v,) if shares_group(spec, v) and not shares_group(spec, 2 * v) else (v, 2 * v)
        rows = sorted({r for r in (1, 2, 4, 8, 16) if r <= oh} | ({oh} if oh <= 16 else set()))
        layouts = grid(layout_in=(NCHW, lanes_layout(cpu)), layout_out=(NCHW, lanes_layout(cpu))) \
            if blocks_layouts(spec, v) else [{"layout_in": NCHW, "layout_out": NCHW}]
        for io in layouts:
            for k in grid(vector=("channels",), c_block=c_blocks, block=(4, 7, 8, 14, 16), tile_rows=(1, 2),
                          rows=rows):
                if io != {"layout_in": NCHW, "layout_out": NCHW} and k["c_block"] != v:
                    continue
                if registers_ok(cpu, k["block"] * k["tile_rows"], k["c_block"]) and k["block"] <= ow \
                        and k["tile_rows"] <= k["rows"]:
                    yield {**k, **io}
        for k in grid(vector=("width",), block=(v, 2 * v, 4 * v, 8 * v), tile_rows=(1, 2, 4), rows=rows):
            vectors = _cdiv(min(k["block"], ow), v)
            if k["block"] < ow + v and registers_ok(cpu, vectors * v * k["tile_rows"], v) \
                    and k["tile_rows"] <= k["rows"]:
                yield k
