"""The CPO and CPS encoder: one TIR PrimFunc from the activation to the format.

    CPO: x (N, C, H, W) float32, cols -> cpo_vals, cpo_rows, cpo_ptr
    CPS: x (N, C, H, W) float32, cols -> cps_vals, cps_index, cps_vptr, cps_iptr

(shapes in cpo_layout.py). Three passes: a count per (n, c), vectorised over the input
columns, into the pointer arrays; a serial prefix sum; a fill per (n, c) that reads the
input row-major (contiguous) with a write cursor per column. The fill is branch-free: each
value is written, and the cursor advances only past a non-zero, so a zero is overwritten by
the column's next element. CPS counts and fills by aligned sets of 4 padded rows
(docs/algorithms.md sections 4.3 and 5).
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..conv import Conv2DSpec
from ..reference.cpo import CPS_FLAG, CPS_SET
from .base import nonzero, prim
from .cpo_layout import Geometry, without_iptr


def encoder(spec: Conv2DSpec, packed: bool):
    """The CPO (packed=False) or CPS (packed=True) encoder PrimFunc.

    CPO: (x, cols) -> (vals [cap], rows [cap], ptr [groups + 1]).
    CPS: (x, cols) -> (vals [cap], index [cap], vptr [groups + 1], iptr [groups + 1]).
    """
    g = Geometry(spec)
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

    # CPS's signature; CPO's rows go in ``index`` and its body never reads ``iptr`` (dropped)
    @T.prim_func
    def encode(x: T.Buffer(XS, "float32"), cols: T.Buffer((NCL,), "int32"),
               vals: T.Buffer((CAP,), "float32"), index: T.Buffer((CAP,), "int32"),
               vptr: T.Buffer((G + 1,), "int32"), iptr: T.Buffer((G + 1,), "int32")):
        count(x, cols, vptr, iptr)
        prefix_sum(vptr)
        if packed:
            prefix_sum(iptr)
            fill_cps(x, cols, vals, index, vptr, iptr)
        else:
            fill_cpo(x, cols, vals, index, vptr)

    return prim(without_iptr(encode, packed))
