"""cpo: Compressed Pattern Overlap (Amer et al.): store each NZE of the activation once.

Format (reference/cpo.py has the details and the NumPy twin): the kept padded columns
in a static order, by overlap type then column (``cols``, a build-time constant), and per
(image, channel, column) the column's NZEs by ascending padded row: ``cpo_vals`` float32
and ``cpo_rows`` int32, both sized for every input element (N*C*H*ncols; the valid
prefix is ``cpo_ptr[-1]`` long), and ``cpo_ptr`` int32 [N*C*ncols + 1].

Encoder (one PrimFunc): a count pass per (n, c) vectorised over the input columns, a
serial prefix sum, a fill pass per (n, c) reading the input row-major with a write
cursor per column (branch-free: a zero is written and then overwritten).

Multiply: see :func:`multiply`; CPS (algorithms/cps.py) reuses all of this with
``packed=True``, which changes only the row decoding. Weights are laid out
[M/Mt][C][Kh][Kw][Mt] at build time, M padded with zero filters to a multiple of the
M tile. All-zero channels are skipped by one pointer comparison.

Knobs: multiply ("gather" | "scatter"), m_tile (output channels per vector block),
pixels (gather: output pixels per register block), chunks (gather: parallel tasks),
row_tile (scatter: output rows per accumulator block).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..reference.cpo import (CPO, CPS_BASE_MASK, CPS_FLAG, CPS_SET, column_order, cpo_encode, cpo_multiply,
                             cpo_storage)
from ..cpu import CPU
from ..reference.storage import Storage
from .base import Algorithm, Buffer, KnobError, Stage, bias_constant, epilogue_value, nonzero, prim

MIN_TILE = 16  # M tiles are halved down to 16 channels at least (a layout choice, for every ISA)


def on_grid(d, stride: int):
    """TIR (or True at stride 1): offset d is a multiple of the stride."""
    return True if stride == 1 else d % stride == 0


def m_tiling(m: int, m_tile: int) -> tuple[int, int]:
    """(tile, padded M): the M tile and M rounded up to a multiple of it.

    M <= m_tile: one tile of exactly M. Otherwise the largest of m_tile, m_tile/2, ...
    (down to MIN_TILE) that divides M; if none does, m_tile with zero filters added.
    """
    if m_tile < 1:
        raise KnobError(f"m_tile must be >= 1, got {m_tile}")
    if m <= m_tile:
        return m, m
    t = m_tile
    while m % t and t % 2 == 0 and t > MIN_TILE:
        t //= 2
    if m % t:
        t = m_tile
    return t, -(-m // t) * t


def weight_layout(weight: np.ndarray, m_tile: int, m_pad: int) -> np.ndarray:
    """OIHW -> [Mp/Mt][C][Kh][Kw][Mt] float32, filters M..Mp-1 zero."""
    m, c, kh, kw = weight.shape
    wp = np.zeros((m_pad, c, kh, kw), np.float32)
    wp[:m] = weight
    return np.ascontiguousarray(wp.reshape(m_pad // m_tile, m_tile, c, kh, kw).transpose(0, 2, 3, 4, 1))


class _Geometry:
    """Static sizes of one layer in the CPO/CPS layout."""

    def __init__(self, spec: Conv2DSpec):
        self.spec = spec
        self.n, self.c, self.h, self.w = spec.x_shape
        self.cols = column_order(spec)
        self.ncols = len(self.cols)  # 0 when no input column lies in a window (huge padding)
        self.cols_len = max(self.ncols, 1)  # the ``cols`` constant: never an empty buffer
        self.groups = self.n * self.c * self.ncols  # (n, c, column) groups: pointer count - 1
        self.cap = max(self.n * self.c * self.h * self.ncols, 1)  # every element non-zero

    def cols_constant(self) -> np.ndarray:
        out = np.zeros(self.cols_len, np.int32)
        out[:self.ncols] = self.cols
        return out


# --------------------------------------------------------------------------------------------
# encoder


def encoder(spec: Conv2DSpec, packed: bool):
    """The CPO (packed=False) or CPS (packed=True) encoder PrimFunc.

    CPO: (x, cols) -> (vals [cap], rows [cap], ptr [groups + 1]).
    CPS: (x, cols) -> (vals [cap], index [cap], vptr [groups + 1], iptr [groups + 1]).
    """
    g = _Geometry(spec)
    N, C, H, W, NCOL, NCL, G = g.n, g.c, g.h, g.w, g.ncols, g.cols_len, g.groups
    pt, pl = spec.padding[0], spec.padding[1]
    S = CPS_SET
    b_lo, b_hi = pt // S, (pt + H - 1) // S + 1  # the sets of 4 padded rows holding input rows
    FLAG = int(CPS_FLAG)

    @T.macro
    def count(x_, cols_, cnt_ptr, ent_ptr):
        """Per (n, c, column): NZEs into cnt_ptr[g + 1], CPS index entries into ent_ptr[g + 1]."""
        for nc in T.parallel(N * C):
            cnt = T.alloc_local((W,), "int32")
            ent = T.alloc_local((W,), "int32")
            sc = T.alloc_local((W,), "int32")
            for w in T.vectorized(W):
                cnt[w] = 0
                ent[w] = 0
            if packed:
                for b in range(b_lo, b_hi):
                    for w in T.vectorized(W):
                        sc[w] = 0
                    for t in range(S):
                        if S * b + t - pt >= 0 and S * b + t - pt < H:
                            for w in T.vectorized(W):
                                sc[w] = sc[w] + T.Cast("int32", nonzero(x_[nc // C, nc % C, S * b + t - pt, w]))
                    for w in T.vectorized(W):
                        cnt[w] = cnt[w] + sc[w]
                        ent[w] = ent[w] + T.Select(sc[w] >= 3, 1, sc[w])
            else:
                for h in range(H):
                    for w in T.vectorized(W):
                        cnt[w] = cnt[w] + T.Cast("int32", nonzero(x_[nc // C, nc % C, h, w]))
            for k in range(NCOL):
                cnt_ptr[nc * NCOL + k + 1] = cnt[cols_[k] - pl]
                if packed:
                    ent_ptr[nc * NCOL + k + 1] = ent[cols_[k] - pl]

    @T.macro
    def prefix_sum(p_):
        p_[0] = 0
        for i in range(G):
            p_[i + 1] = p_[i + 1] + p_[i]

    @T.macro
    def column_ranges(cols_, p_, pos_, end_, nc_):
        """[pos_[w], end_[w]): where input column w of (n, c) goes in p_'s array (empty if the
        column is dropped)."""
        for w in range(W):
            pos_[w] = 0
            end_[w] = 0
        for k in range(NCOL):
            pos_[cols_[k] - pl] = p_[nc_ * NCOL + k]
            end_[cols_[k] - pl] = p_[nc_ * NCOL + k + 1]

    @T.macro
    def append(arr_, pos_, end_, w_, v_, step_):
        """arr_[pos] = v_, pos += step_, while the column has room. A write with step 0 is
        overwritten by the column's next element: no data-dependent branch."""
        if pos_[w_] < end_[w_]:
            arr_[pos_[w_]] = v_
            pos_[w_] = pos_[w_] + step_

    # Both fills walk each (n, c) row-major (contiguous reads) with a write cursor per column.
    @T.macro
    def fill_cpo(x_, cols_, vals_, rows_, ptr_):
        for nc in T.parallel(N * C):
            pos = T.alloc_local((W,), "int32")
            end = T.alloc_local((W,), "int32")
            column_ranges(cols_, ptr_, pos, end, nc)
            for h, w in T.grid(H, W):
                if pos[w] < end[w]:
                    vals_[pos[w]] = x_[nc // C, nc % C, h, w]
                    rows_[pos[w]] = h + pt
                    pos[w] = pos[w] + T.Cast("int32", nonzero(x_[nc // C, nc % C, h, w]))

    @T.macro
    def fill_cps(x_, cols_, vals_, index_, vptr_, iptr_):
        for nc in T.parallel(N * C):
            vpos = T.alloc_local((W,), "int32")
            vend = T.alloc_local((W,), "int32")
            ipos = T.alloc_local((W,), "int32")
            iend = T.alloc_local((W,), "int32")
            xs = T.alloc_local((S,), "float32")  # the set's 4 values
            mask = T.alloc_local((1,), "int32")
            column_ranges(cols_, vptr_, vpos, vend, nc)
            column_ranges(cols_, iptr_, ipos, iend, nc)
            for b, w in T.grid(b_hi - b_lo, W):
                mask[0] = 0
                for t in T.unroll(S):
                    xs[t] = T.if_then_else(S * (b + b_lo) + t - pt >= 0 and S * (b + b_lo) + t - pt < H,
                                           x_[nc // C, nc % C, S * (b + b_lo) + t - pt, w], T.float32(0))
                    mask[0] = mask[0] | (T.Cast("int32", nonzero(xs[t])) << t)
                if mask[0] != 0:
                    for t in T.unroll(S):
                        append(vals_, vpos, vend, w, xs[t], (mask[0] >> t) & 1)
                        # 3-4 NZEs: one entry FLAG | base row << 4 | mask (written 4 times, kept
                        # once); 1-2: the raw rows
                        append(index_, ipos, iend, w,
                               T.Select(T.popcount(mask[0]) >= 3, FLAG | ((S * (b + b_lo)) << 4) | mask[0],
                                        S * (b + b_lo) + t),
                               T.Select(T.popcount(mask[0]) >= 3, T.Cast("int32", t == S - 1), (mask[0] >> t) & 1))

    XS, CAP = (N, C, H, W), g.cap
    if packed:
        @T.prim_func
        def encode(x: T.Buffer(XS, "float32"), cols: T.Buffer((NCL,), "int32"),
                   cps_vals: T.Buffer((CAP,), "float32"), cps_index: T.Buffer((CAP,), "int32"),
                   cps_vptr: T.Buffer((G + 1,), "int32"), cps_iptr: T.Buffer((G + 1,), "int32")):
            count(x, cols, cps_vptr, cps_iptr)
            prefix_sum(cps_vptr)
            prefix_sum(cps_iptr)
            fill_cps(x, cols, cps_vals, cps_index, cps_vptr, cps_iptr)
    else:
        @T.prim_func
        def encode(x: T.Buffer(XS, "float32"), cols: T.Buffer((NCL,), "int32"),
                   cpo_vals: T.Buffer((CAP,), "float32"), cpo_rows: T.Buffer((CAP,), "int32"),
                   cpo_ptr: T.Buffer((G + 1,), "int32")):
            count(x, cols, cpo_ptr, cpo_ptr)
            prefix_sum(cpo_ptr)
            fill_cpo(x, cols, cpo_vals, cpo_rows, cpo_ptr)
    return prim(encode)


# --------------------------------------------------------------------------------------------
# multiply


def multiply(spec: Conv2DSpec, epilogue: Epilogue, knobs, packed: bool):
    """The CPO (packed=False) or CPS multiply PrimFunc: format, cols, wt [, bias] -> y.

    Both kernels read the format through one storage-order walk (``walk``) that decodes
    CPS entries on the fly; ``knobs["multiply"]`` picks what is done with each NZE:

    "gather" (default): per image, the walk writes every NZE once into a zeroed
    [Hp][C][WB] row-major copy of the padded input, then per (input row, segment of L
    padded columns that B consecutive output pixels read) the channels with a non-zero
    there are listed; the multiply then keeps a B x m_tile block of outputs in registers
    and, per (kernel row, listed channel), does Kw*B vector FMAs, each weight vector
    loaded once for B pixels (the halo-segment kernel of kernel-notes.md, fed from CPO).
    M tiles are the outer loop so that one tile's weights stay in L2.

    "scatter" (the paper's): each task (image, tile of ``row_tile`` output rows, M tile)
    walks the image's NZEs and adds each into every output it feeds,
    acc[r, s, :] += v * K[c, l, q, :], in a [row_tile][Ow][m_tile] block (whole image by
    default: 800 KB for 56 x 56 x 64 fits L2).
    """
    g = _Geometry(spec)
    N, C, NCOL, NCL, G, CAP = g.n, g.c, g.ncols, g.cols_len, g.groups, g.cap
    M, OH, OW, KH, KW = spec.out_channels, spec.out_h, spec.out_w, spec.kernel_h, spec.kernel_w
    (SH, SW), (DH, DW) = spec.stride, spec.dilation
    HP = spec.padded_h
    kind = knobs["multiply"]
    if kind not in ("gather", "scatter"):
        raise KnobError(f"multiply must be 'gather' or 'scatter', got {kind!r}")
    MT, MP = m_tiling(M, int(knobs["m_tile"]))
    MO = MP // MT
    ES = CPS_SET if packed else 1  # rows one index entry may stand for
    # gather: groups of B output pixels of a row, each reading L padded columns
    B = max(1, min(int(knobs["pixels"]), OW))
    NG = -(-OW // B)
    L = (B - 1) * SW + (KW - 1) * DW + 1
    WB = max(spec.padded_w, (NG - 1) * B * SW + L)  # dense row width (zeros past the input)
    P = max(1, min(int(knobs["chunks"]), OH * NG))  # parallel tasks over the (row, group) items
    IPC = -(-(OH * NG) // P)
    # scatter: tasks (image, row tile, M tile)
    R = max(1, min(int(knobs["row_tile"]), OH))
    RT = -(-OH // R)

    def entry_base(ent):
        """First padded row of an index entry (a CPS set: its base row)."""
        return tvm.tirx.if_then_else(ent >= 0, ent, (ent >> 4) & CPS_BASE_MASK) if packed else ent

    def entry_mask(ent):
        """Bit t: padded row base + t holds one of the entry's values."""
        return tvm.tirx.if_then_else(ent >= 0, 1, ent & 15) if packed else 1

    def entry_count(ent):
        return tvm.tirx.popcount(entry_mask(ent)) if packed else 1

    def values_before(ent, t):
        """The entry's values in rows base .. base + t - 1."""
        return tvm.tirx.popcount(entry_mask(ent) & ((1 << t) - 1)) if packed else 0

    @T.macro
    def walk(fmt, n, c, lo, hi, vp, action, ctx):
        """action(ctx, v, i, j, c) for each NZE v at padded (i, j) of image n, channel c, in
        storage order, skipping index entries wholly outside rows [lo, hi] (a CPS set may
        still bring rows just outside: actions check the row). fmt = (vals, index, vptr,
        iptr, cols); CPO passes (vals, rows, ptr, ptr, cols). vp: a 1-int scratch."""
        vals_, index_, vptr_, iptr_, cols_ = fmt[0], fmt[1], fmt[2], fmt[3], fmt[4]
        for k in range(NCOL):
            vp[0] = vptr_[(n * C + c) * NCOL + k]
            for e in range(iptr_[(n * C + c) * NCOL + k], iptr_[(n * C + c) * NCOL + k + 1]):
                if entry_base(index_[e]) + (ES - 1) >= lo and entry_base(index_[e]) <= hi:
                    for t in T.unroll(ES):
                        if (entry_mask(index_[e]) >> t) & 1 == 1:
                            action(ctx, vals_[vp[0] + values_before(index_[e], t)], entry_base(index_[e]) + t,
                                   cols_[k], c)
                vp[0] = vp[0] + entry_count(index_[e])

    @T.macro
    def store(y_, bias_, acc_val, n, m, r, s):
        if m < M and s < OW:
            y_[n, m, r, s] = epilogue_value(acc_val, m, bias_, epilogue)

    # -- gather ------------------------------------------------------------------------------
    @T.macro
    def densify(ctx, v, i, j, c):
        ctx[0][i, c, j] = v

    @T.macro
    def gather_item(dense, lst, cnt, acc, wt_, bias_, y_, n, mo, r, gi):
        """Outputs (r, gi*B .. gi*B + B-1) x M tile mo: per kernel row l and listed channel c,
        acc[b, :] += dense[r*Sh + l*Dh, c, gi*B*Sw + b*Sw + q*Dw] * K[c, l, q, :]."""
        for b in T.unroll(B):
            for m in T.vectorized(MT):
                acc[b, m] = T.float32(0)
        for l in range(KH):
            for e in range(cnt[r * SH + l * DH, gi]):
                for q in T.unroll(KW):
                    for b in T.unroll(B):
                        for m in T.vectorized(MT):
                            acc[b, m] = acc[b, m] + (
                                dense[r * SH + l * DH, lst[r * SH + l * DH, gi, e], gi * B * SW + b * SW + q * DW]
                                * wt_[mo, lst[r * SH + l * DH, gi, e], l, q, m])
        for m, b in T.grid(MT, B):
            store(y_, bias_, acc[b, m], n, mo * MT + m, r, gi * B + b)

    @T.macro
    def gather_body(fmt, wt_, bias_, y_):
        """Per image: zero ``dense``; densify it (parallel over channels); list, per (input
        row, group), the channels whose segment holds a non-zero (parallel over rows); then
        per M tile, P parallel tasks over runs of (output row, group) items."""
        dense = T.alloc_buffer((HP, C, WB), "float32")  # one image, padded, row-major over channels
        lst = T.alloc_buffer((HP, NG, C), "int32")  # per (row, group): channels with a non-zero
        cnt = T.alloc_buffer((HP, NG), "int32")
        for n in range(N):
            for i in T.parallel(HP):
                for c in range(C):
                    for d in T.vectorized(WB):
                        dense[i, c, d] = T.float32(0)
            for c in T.parallel(C):
                vp = T.alloc_local((1,), "int32")
                if fmt[2][(n * C + c) * NCOL] < fmt[2][(n * C + c + 1) * NCOL]:  # all-zero channels: skipped
                    walk(fmt, n, c, 0, HP - 1, vp, densify, (dense,))
            for i in T.parallel(HP):
                nz = T.alloc_local((1,), "int32")
                for gi in range(NG):
                    cnt[i, gi] = 0
                    for c in range(C):
                        nz[0] = 0
                        for d in range(L):
                            nz[0] = nz[0] | T.Cast("int32", nonzero(dense[i, c, gi * B * SW + d]))
                        lst[i, gi, cnt[i, gi]] = c
                        cnt[i, gi] = cnt[i, gi] + nz[0]
            for mo in range(MO):
                for p in T.parallel(P):
                    acc = T.alloc_buffer((B, MT), "float32")  # LLVM keeps it in registers (noalias)
                    for it in range(IPC):
                        # a run of items (output row, group): a task reads about 1/P of dense
                        if p * IPC + it < OH * NG:
                            gather_item(dense, lst, cnt, acc, wt_, bias_, y_, n, mo, (p * IPC + it) // NG,
                                        (p * IPC + it) % NG)

    # -- scatter -----------------------------------------------------------------------------
    @T.macro
    def scatter(ctx, v, i, j, c):
        """ctx = (acc, wt, r0, mo): acc[r - r0, s, :] += v * K[c, l, q, :] for every output
        (r, s) of the tile that the NZE v at padded (i, j) feeds."""
        acc, wt_, r0, mo = ctx[0], ctx[1], ctx[2], ctx[3]
        for l in T.unroll(KH):
            if on_grid(i - l * DH, SH):
                if (i - l * DH) // SH >= r0 and (i - l * DH) // SH < T.min(r0 + R, OH):
                    for q in T.unroll(KW):
                        if on_grid(j - q * DW, SW):
                            if j - q * DW >= 0 and (j - q * DW) // SW < OW:
                                for m in T.vectorized(MT):
                                    acc[(i - l * DH) // SH - r0, (j - q * DW) // SW, m] = (
                                        acc[(i - l * DH) // SH - r0, (j - q * DW) // SW, m]
                                        + v * wt_[mo, c, l, q, m])

    @T.macro
    def scatter_body(fmt, wt_, bias_, y_):
        for task in T.parallel(N * RT * MO):
            acc = T.alloc_buffer((R, OW, MT), "float32")
            vp = T.alloc_local((1,), "int32")
            for r, s in T.grid(R, OW):
                for m in T.vectorized(MT):
                    acc[r, s, m] = T.float32(0)
            for c in range(C):
                if fmt[2][(task // (RT * MO) * C + c) * NCOL] < fmt[2][(task // (RT * MO) * C + c + 1) * NCOL]:
                    # the padded input rows this row tile reads
                    walk(fmt, task // (RT * MO), c, task // MO % RT * R * SH,
                         (T.min(task // MO % RT * R + R, OH) - 1) * SH + (KH - 1) * DH, vp,
                         scatter, (acc, wt_, task // MO % RT * R, task % MO))
            for m, r, s in T.grid(MT, R, OW):
                if task // MO % RT * R + r < OH:
                    store(y_, bias_, acc[r, s, m], task // (RT * MO), task % MO * MT + m,
                          task // MO % RT * R + r, s)

    body = gather_body if kind == "gather" else scatter_body
    WT = (MO, C, KH, KW, MT)
    YS = spec.y_shape
    # one signature per (format, bias); the body is shared
    if packed and epilogue.bias:
        @T.prim_func
        def mul(cps_vals: T.Buffer((CAP,), "float32"), cps_index: T.Buffer((CAP,), "int32"),
                cps_vptr: T.Buffer((G + 1,), "int32"), cps_iptr: T.Buffer((G + 1,), "int32"),
                cols: T.Buffer((NCL,), "int32"), wt: T.Buffer(WT, "float32"), bias: T.Buffer((M,), "float32"),
                y: T.Buffer(YS, "float32")):
            body((cps_vals, cps_index, cps_vptr, cps_iptr, cols), wt, bias, y)
    elif packed:
        @T.prim_func
        def mul(cps_vals: T.Buffer((CAP,), "float32"), cps_index: T.Buffer((CAP,), "int32"),
                cps_vptr: T.Buffer((G + 1,), "int32"), cps_iptr: T.Buffer((G + 1,), "int32"),
                cols: T.Buffer((NCL,), "int32"), wt: T.Buffer(WT, "float32"), y: T.Buffer(YS, "float32")):
            body((cps_vals, cps_index, cps_vptr, cps_iptr, cols), wt, None, y)
    elif epilogue.bias:
        @T.prim_func
        def mul(cpo_vals: T.Buffer((CAP,), "float32"), cpo_rows: T.Buffer((CAP,), "int32"),
                cpo_ptr: T.Buffer((G + 1,), "int32"), cols: T.Buffer((NCL,), "int32"),
                wt: T.Buffer(WT, "float32"), bias: T.Buffer((M,), "float32"), y: T.Buffer(YS, "float32")):
            body((cpo_vals, cpo_rows, cpo_ptr, cpo_ptr, cols), wt, bias, y)
    else:
        @T.prim_func
        def mul(cpo_vals: T.Buffer((CAP,), "float32"), cpo_rows: T.Buffer((CAP,), "int32"),
                cpo_ptr: T.Buffer((G + 1,), "int32"), cols: T.Buffer((NCL,), "int32"),
                wt: T.Buffer(WT, "float32"), y: T.Buffer(YS, "float32")):
            body((cpo_vals, cpo_rows, cpo_ptr, cpo_ptr, cols), wt, None, y)
    return prim(mul)

# --------------------------------------------------------------------------------------------
# the algorithms


class CPOAlgorithm(Algorithm):
    """CPO; :class:`~tvm_sparseconv.algorithms.cps.CPSAlgorithm` differs only in ``packed``."""

    name = "cpo"
    sparse = True
    packed = False
    knob_defaults = {"multiply": "gather", "m_tile": 64, "pixels": 4, "chunks": 2, "row_tile": 0}

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        """Measured on the VGG layer (256x56x56, 3x3, M 256) on AVX-512: B4 x M64 = 16
        accumulators. The M tile is 4 vectors of the CPU; narrower M tiles get more pixels per
        block, up to cpu.accumulators registers; one task per core; the scatter's block is the
        whole image (row_tile = Oh)."""
        mt = m_tiling(spec.out_channels, 4 * cpu.lanes)[0]
        return dict(self.knob_defaults, m_tile=4 * cpu.lanes,
                    pixels=max(1, min(8, cpu.accumulators * cpu.lanes // mt)), chunks=cpu.cores,
                    row_tile=spec.out_h)

    def check(self, spec: Conv2DSpec) -> None:
        spec.require(self.name)  # groups=1; stride, dilation, padding: any

    def format_buffers(self, spec: Conv2DSpec) -> tuple[Buffer, ...]:
        g, p = _Geometry(spec), self.name
        ind = "index" if self.packed else "rows"
        bufs = (Buffer(f"{p}_vals", (g.cap,)), Buffer(f"{p}_{ind}", (g.cap,), "int32"),
                Buffer(f"{p}_{'vptr' if self.packed else 'ptr'}", (g.groups + 1,), "int32"))
        if self.packed:
            bufs += (Buffer(f"{p}_iptr", (g.groups + 1,), "int32"),)
        return bufs

    def constants(self, spec, weight, bias, knobs):
        mt, mp = m_tiling(spec.out_channels, int(knobs["m_tile"]))
        return {"cols": _Geometry(spec).cols_constant(), "wt": weight_layout(np.asarray(weight, np.float32), mt, mp),
                **bias_constant(spec, bias)}

    def stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        fmt = self.format_buffers(spec)
        names = tuple(b.name for b in fmt)
        return [
            Stage("encode", "encode", encoder(spec, self.packed), ("x", "cols"), fmt),
            Stage("multiply", "multiply", multiply(spec, epilogue, knobs, self.packed),
                  names + ("cols", "wt") + (("bias",) if epilogue.bias else ()),
                  (Buffer("y", spec.y_shape),)),
        ]

    # -- the format as NumPy arrays -------------------------------------------------------
    def unpack(self, spec: Conv2DSpec, produced) -> CPO:
        """The valid prefix of what the compiled encoder produced, as the reference's CPO."""
        p = produced
        nnz = int(p["cpo_ptr"][-1])
        return CPO(p["cpo_vals"][:nnz], p["cpo_rows"][:nnz], p["cpo_ptr"], column_order(spec))

    def encode_reference(self, spec: Conv2DSpec, x: np.ndarray) -> CPO:
        return cpo_encode(spec, x)

    def format_storage(self, fmt) -> Storage:
        return cpo_storage(fmt)

    def multiply_reference(self, spec, fmt, w):
        return cpo_multiply(spec, fmt, w)

    def storage(self, spec, knobs, produced):
        return self.format_storage(self.unpack(spec, produced))

    def reference_storage(self, spec, knobs, x):
        return self.format_storage(self.encode_reference(spec, x))

    def reference(self, spec, knobs, x, w):
        return self.multiply_reference(spec, self.encode_reference(spec, x), w)


ALGORITHM = CPOAlgorithm()
