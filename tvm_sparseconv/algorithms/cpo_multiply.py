"""The CPO and CPS multiply: gather and scatter kernels over either format.

    CPO: cpo_vals, cpo_rows, cpo_ptr, cols, wt [, bias] -> y (N, M, Oh, Ow) float32
    CPS: cps_stream, cps_ptr, cols, wt [, bias] -> y

(format shapes and wt = [Mp/Mt][C][Kh][Kw][Mt] in cpo_layout.py). Both kernels read the
format through one storage-order walk (``walk``) that decodes CPS entries on the fly, so
CPO and CPS differ only in that decoding (``packed``). All-zero channels are skipped by one
pointer comparison. ``knobs["multiply"]`` picks the kernel; see :func:`multiply`.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from ..conv import Conv2DSpec, Epilogue
from ..reference.cpo import CPS_BASE_MASK, CPS_SET
from .base import KnobError, drop_unused, nonzero, prim, store_output
from .cpo_layout import Geometry, for_format, m_tiling


def on_grid(d, stride: int):
    """TIR (or True at stride 1): offset d is a multiple of the stride."""
    return True if stride == 1 else d % stride == 0


def multiply(spec: Conv2DSpec, epilogue: Epilogue, knobs, packed: bool):
    """The CPO (packed=False) or CPS multiply PrimFunc: format, cols, wt [, bias] -> y.

    ``knobs["multiply"]`` picks what is done with each NZE the walk yields:

    "gather" (default): per image, the walk writes every NZE once into a zeroed
    [Hp][C][WB] row-major copy of the padded input, then per (input row, segment of L
    padded columns that B consecutive output pixels read) the channels with a non-zero
    there are listed; the multiply then keeps a B x m_tile block of outputs in registers
    and, per (kernel row, listed channel), does Kw*B vector FMAs, each weight vector
    loaded once for B pixels (halo's multiply fed from CPO: docs/algorithms.md section
    4.4). M tiles are the outer loop so that one tile's weights stay in L2.
    Knobs: m_tile, pixels (B), chunks (parallel tasks).

    "scatter" (the paper's): each task (image, tile of ``row_tile`` output rows, M tile)
    walks the image's NZEs and adds each into every output it feeds,
    acc[r, s, :] += v * K[c, l, q, :], in a [row_tile][Ow][m_tile] block (whole image by
    default: 800 KB for 56 x 56 x 64 fits L2). Knobs: m_tile, row_tile.
    """
    g = Geometry(spec)
    N, C, NCOL, NCL, G, CAP = g.n, g.c, g.ncols, g.cols_len, g.groups, g.cap
    M, OH, OW, KH, KW = spec.out_channels, spec.out_h, spec.out_w, spec.kernel_h, spec.kernel_w
    (SH, SW), (DH, DW) = spec.stride, spec.dilation
    HP = spec.padded_h
    kind = knobs["multiply"]
    if kind not in ("gather", "scatter"):
        raise KnobError(f"multiply must be 'gather' or 'scatter', got {kind!r}")
    MT, MP = m_tiling(M, int(knobs["m_tile"]))
    MO = MP // MT
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

    # -- the walk over the format -------------------------------------------------------------
    def entry_base(ent):
        """First padded row of a CPS entry (a set: its base row; a raw row: itself)."""
        return tvm.tirx.if_then_else(ent >= 0, ent, (ent >> 4) & CPS_BASE_MASK)

    def entry_mask(ent):
        """Bit t: padded row base + t holds one of the entry's values."""
        return tvm.tirx.if_then_else(ent >= 0, 1, ent & 15)

    def values_before(mask, t):
        """An entry's values in rows base .. base + t - 1, from its mask."""
        return tvm.tirx.popcount(mask & ((1 << t) - 1))

    @T.macro
    def walk(fmt, n, c, lo, hi, vp, action, ctx):
        """action(ctx, v, i, j, c) for each NZE v at padded (i, j) of image n, channel c, in
        storage order, skipping the NZEs (CPO) or entries (CPS) wholly outside rows [lo, hi]
        (a CPS set may still bring rows just outside: actions check the row).
        fmt = (vals, index, ptr, cols): CPO's index is its rows; CPS's is its stream (vals
        unused), walked entry by entry with the cursor vp (a 1-int scratch)."""
        # no name is bound to fmt[0]: TVMScript would rename CPS's unused ``vals`` parameter,
        # which for_format drops by name
        index_, ptr_, cols_ = fmt[1], fmt[2], fmt[3]
        for k in range(NCOL):
            if packed:
                vp[0] = ptr_[(n * C + c) * NCOL + k]
                while vp[0] < ptr_[(n * C + c) * NCOL + k + 1]:
                    base = entry_base(index_[vp[0]])
                    mask = entry_mask(index_[vp[0]])
                    if base + (CPS_SET - 1) >= lo and base <= hi:
                        for t in T.unroll(CPS_SET):
                            if (mask >> t) & 1 == 1:
                                # the value after the entry and the set's values in rows below t
                                action(ctx, T.reinterpret("float32", index_[vp[0] + 1 + values_before(mask, t)]),
                                       base + t, cols_[k], c)
                    vp[0] = vp[0] + 1 + T.popcount(mask)
            else:
                for e in range(ptr_[(n * C + c) * NCOL + k], ptr_[(n * C + c) * NCOL + k + 1]):
                    if index_[e] >= lo and index_[e] <= hi:
                        action(ctx, fmt[0][e], index_[e], cols_[k], c)

    @T.macro
    def store(y_, bias_, res_, acc_val, n, m, r, s):
        # both kernels compute whole blocks: zero filters past M, pixels past Ow are not outputs
        if m < M and s < OW:
            store_output(y_, (n, m, r, s), acc_val, bias_, res_, epilogue)

    # -- gather ------------------------------------------------------------------------------
    @T.macro
    def densify(ctx, v, i, j, c):
        ctx[0][i, c, j] = v

    @T.macro
    def gather_item(dense, lst, cnt, acc, wt_, bias_, res_, y_, n, mo, r, gi):
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
            store(y_, bias_, res_, acc[b, m], n, mo * MT + m, r, gi * B + b)

    @T.macro
    def gather_body(fmt, wt_, bias_, res_, y_):
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
                        # branch-free listing: c is always written, kept only if the count moves
                        lst[i, gi, cnt[i, gi]] = c
                        cnt[i, gi] = cnt[i, gi] + nz[0]
            for mo in range(MO):
                for p in T.parallel(P):
                    acc = T.alloc_buffer((B, MT), "float32")  # LLVM keeps it in registers (noalias)
                    for it in range(IPC):
                        # a run of items (output row, group): a task reads about 1/P of dense
                        if p * IPC + it < OH * NG:
                            gather_item(dense, lst, cnt, acc, wt_, bias_, res_, y_, n, mo, (p * IPC + it) // NG,
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
    def scatter_body(fmt, wt_, bias_, res_, y_):
        """Task = (image, row tile, M tile), M tile fastest: zero the [R][Ow][Mt] block, walk
        the rows the tile reads of every non-empty channel, store the block."""
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
                    store(y_, bias_, res_, acc[r, s, m], task // (RT * MO), task % MO * MT + m,
                          task // MO % RT * R + r, s)

    body = gather_body if kind == "gather" else scatter_body
    ICAP = g.stream_cap if packed else CAP

    # CPO's signature with every epilogue input; CPS drops ``vals`` (its values are in the
    # stream, ``index``), drop_unused what ``epilogue`` does not read
    @T.prim_func
    def multiply(vals: T.Buffer((CAP,), "float32"), index: T.Buffer((ICAP,), "int32"),
                 ptr: T.Buffer((G + 1,), "int32"), cols: T.Buffer((NCL,), "int32"),
                 wt: T.Buffer((MO, C, KH, KW, MT), "float32"),
                 bias: T.Buffer((M,), "float32"), res: T.Buffer(spec.y_shape, "float32"),
                 y: T.Buffer(spec.y_shape, "float32")):
        body((vals, index, ptr, cols), wt, bias, res, y)

    return prim(drop_unused(for_format(multiply, packed), epilogue))
