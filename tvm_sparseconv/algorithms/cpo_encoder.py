"""The CPO and CPS encoder: one TIR PrimFunc from the activation to the format.

    CPO: x (N, C, H, W) float32, cols -> cpo_vals, cpo_rows, cpo_ptr
    CPS: x (N, C, H, W) float32, cols -> cps_stream, cps_ptr

(shapes in cpo_layout.py). Three passes: a count per (n, c), vectorised over the input
columns, into the pointer array; a serial prefix sum; a fill per (n, c) that reads the
input row-major (contiguous) with a write cursor per column. The fill is branch-free: each
value is written, and the cursor advances only past a non-zero, so a zero is overwritten by
the column's next element. CPS counts and fills by aligned sets of 4 padded rows
(docs/algorithms.md sections 4.3 and 5).
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..conv import Conv2DSpec
from ..reference.cpo import CPS_FLAG, CPS_PACK, CPS_SET
from .base import nonzero, prim
from .cpo_layout import Geometry, for_format


def single_row(mask):
    """TIR: t of a 4-bit mask holding the one bit t (bits 1 and 3 add 1, bits 2 and 3 add 2)."""
    return T.Cast("int32", mask & 0b1010 != 0) + 2 * T.Cast("int32", mask & 0b1100 != 0)


def encoder(spec: Conv2DSpec, packed: bool):
    """The CPO (packed=False) or CPS (packed=True) encoder PrimFunc.

    CPO: (x, cols) -> (vals [cap], rows [cap], ptr [groups + 1]).
    CPS: (x, cols) -> (stream [stream_cap], ptr [groups + 1]).
    """
    g = Geometry(spec)
    N, C, H, W, NCOL, NCL, G = g.n, g.c, g.h, g.w, g.ncols, g.cols_len, g.groups
    pt, pl = spec.padding[0], spec.padding[1]
    S = CPS_SET
    b_lo, b_hi = g.set_lo, g.set_hi  # the sets of 4 padded rows holding input rows
    FLAG = int(CPS_FLAG)

    @T.macro
    def count(x_, cols_, ptr_):
        """Per (n, c, column), into ptr_[g + 1]: CPO its NZEs, CPS its stream length (the NZEs
        and one entry per non-empty set of 4 rows)."""
        for nc in T.parallel(N * C):
            cnt = T.alloc_local((W,), "int32")
            sc = T.alloc_local((W,), "int32")
            for w in T.vectorized(W):
                cnt[w] = 0
            if packed:
                for b in range(b_lo, b_hi):
                    for w in T.vectorized(W):
                        sc[w] = 0
                    for t in range(S):
                        if S * b + t - pt >= 0 and S * b + t - pt < H:
                            for w in T.vectorized(W):
                                sc[w] = sc[w] + T.Cast("int32", nonzero(x_[nc // C, nc % C, S * b + t - pt, w]))
                    for w in T.vectorized(W):
                        cnt[w] = cnt[w] + sc[w] + T.Cast("int32", sc[w] > 0)
            else:
                for h in range(H):
                    for w in T.vectorized(W):
                        cnt[w] = cnt[w] + T.Cast("int32", nonzero(x_[nc // C, nc % C, h, w]))
            for k in range(NCOL):
                ptr_[nc * NCOL + k + 1] = cnt[cols_[k] - pl]

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
    def fill_cps(x_, cols_, stream_, ptr_):
        for nc in T.parallel(N * C):
            pos = T.alloc_local((W,), "int32")
            end = T.alloc_local((W,), "int32")
            xs = T.alloc_local((S,), "float32")  # the set's 4 values
            mask = T.alloc_local((1,), "int32")
            column_ranges(cols_, ptr_, pos, end, nc)
            for b, w in T.grid(b_hi - b_lo, W):
                mask[0] = 0
                for t in T.unroll(S):
                    xs[t] = T.if_then_else(S * (b + b_lo) + t - pt >= 0 and S * (b + b_lo) + t - pt < H,
                                           x_[nc // C, nc % C, S * (b + b_lo) + t - pt, w], T.float32(0))
                    mask[0] = mask[0] | (T.Cast("int32", nonzero(xs[t])) << t)
                if mask[0] != 0:
                    # the entry: 2-4 NZEs FLAG | base row << 4 | mask, one NZE its raw row
                    append(stream_, pos, end, w,
                           T.Select(T.popcount(mask[0]) >= CPS_PACK, FLAG | ((S * (b + b_lo)) << 4) | mask[0],
                                    S * (b + b_lo) + single_row(mask[0])), 1)
                    # then its values' bits: each written, kept when non-zero
                    for t in T.unroll(S):
                        append(stream_, pos, end, w, T.reinterpret("int32", xs[t]), (mask[0] >> t) & 1)

    XS, CAP, ICAP = (N, C, H, W), g.cap, (g.stream_cap if packed else g.cap)

    # CPO's signature; CPS's stream goes in ``index`` and its body never reads ``vals`` (dropped)
    @T.prim_func
    def encode(x: T.Buffer(XS, "float32"), cols: T.Buffer((NCL,), "int32"),
               vals: T.Buffer((CAP,), "float32"), index: T.Buffer((ICAP,), "int32"),
               ptr: T.Buffer((G + 1,), "int32")):
        count(x, cols, ptr)
        prefix_sum(ptr)
        if packed:
            fill_cps(x, cols, index, ptr)
        else:
            fill_cpo(x, cols, vals, index, ptr)

    return prim(for_format(encode, packed))
