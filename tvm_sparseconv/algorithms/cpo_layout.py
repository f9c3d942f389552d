"""The static layout CPO and CPS share: buffer sizes, the column constant, the weight layout.

The formats (docs/algorithms.md sections 4.2 and 5 specify them; reference/cpo.py holds the NumPy
twin). ``ncols`` padded columns are kept (those some window reads), in
the static order ``cols`` (by overlap type, then column: a build-time constant); a group is
(image n, channel c, position k), g = (n*C + c)*ncols + k, holding the NZEs of padded column
cols[k] by ascending padded row. Data-dependent arrays are sized for every input element
non-zero (the valid prefix is the last pointer):

    cols         (max(ncols, 1),)     int32    padded column at each position
    cpo_vals     (cap,)               float32  cap = max(N*C*H*ncols, 1)
    cpo_rows     (cap,)               int32    padded row of each value
    cpo_ptr      (N*C*ncols + 1,)     int32    group g's values and rows: [ptr[g], ptr[g + 1])
    cps_stream   (stream_cap,)        int32    per non-empty set of 4 rows: an entry, its values' bits
    cps_ptr      (N*C*ncols + 1,)     int32    group g's stream: [ptr[g], ptr[g + 1])

stream_cap = max(N*C*ncols*(H + sets), 1), ``sets`` the aligned sets of 4 padded rows that
hold an input row: a column holds at most H values and one entry per set, both reached when
every element is non-zero.

The kernels are written once with CPO's parameters (vals, index, ptr): CPO's ``index`` is its
rows, CPS's is its stream, which carries the values too, so CPS's kernels are that signature
without ``vals`` (:func:`for_format`).

Weights (``wt``): [Mp/Mt][C][Kh][Kw][Mt] float32, Mt the M tile and Mp = M rounded up to a
multiple of it with zero filters (:func:`m_tiling`, :func:`weight_layout`).
"""
from __future__ import annotations

import numpy as np
import tvm

from ..conv import Conv2DSpec
from ..reference.cpo import CPS_SET, column_order
from .base import KnobError

MIN_TILE = 16  # M tiles are halved down to 16 channels at least (a layout choice, for every ISA)


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


class Geometry:
    """Static sizes of one layer in the CPO/CPS layout (the table above)."""

    def __init__(self, spec: Conv2DSpec):
        self.spec = spec
        self.n, self.c, self.h, self.w = spec.x_shape
        self.cols = column_order(spec)
        self.ncols = len(self.cols)  # 0 when no input column lies in a window (huge padding)
        self.cols_len = max(self.ncols, 1)  # the ``cols`` constant: never an empty buffer
        self.groups = self.n * self.c * self.ncols  # (n, c, column) groups: pointer count - 1
        self.cap = max(self.n * self.c * self.h * self.ncols, 1)  # every element non-zero
        pt = spec.padding[0]
        # CPS: the aligned sets of 4 padded rows that hold input rows, [set_lo, set_hi)
        self.set_lo, self.set_hi = pt // CPS_SET, (pt + self.h - 1) // CPS_SET + 1
        self.stream_cap = max(self.groups * (self.h + self.set_hi - self.set_lo), 1)

    def cols_constant(self) -> np.ndarray:
        """int32 [cols_len]: ``cols``, zero-padded to one element when no column is kept."""
        out = np.zeros(self.cols_len, np.int32)
        out[:self.ncols] = self.cols
        return out


def for_format(func: tvm.tirx.PrimFunc, packed: bool) -> tvm.tirx.PrimFunc:
    """A kernel written with CPO's parameters (vals, index, ptr, ...): CPO's (packed=False) as
    is, CPS's without ``vals``, which its body never reads (the stream is ``index``; like
    base.drop_unused for bias/res)."""
    if not packed:
        return func
    keep = [p for p in func.params if p.name != "vals"]
    if len(keep) != len(func.params) - 1:  # TVMScript renames a parameter bound to another name
        raise RuntimeError(f"no parameter 'vals' among {[p.name for p in func.params]}")
    return tvm.tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs)
