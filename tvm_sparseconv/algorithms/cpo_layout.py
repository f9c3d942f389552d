"""The static layout CPO and CPS share: buffer sizes, the column constant, the weight layout.

The formats (docs/algorithms.md sections 4.2 and 5 specify them; reference/cpo.py holds the NumPy
twin). ``ncols`` padded columns are kept (those some window reads), in
the static order ``cols`` (by overlap type, then column: a build-time constant); a group is
(image n, channel c, position k), g = (n*C + c)*ncols + k, holding the NZEs of padded column
cols[k] by ascending padded row. Data-dependent arrays are sized for every input element
non-zero (``cap``; the valid prefix is the last pointer):

    cols                   (max(ncols, 1),)     int32    padded column at each position
    cpo_vals / cps_vals    (cap,)               float32  cap = max(N*C*H*ncols, 1)
    cpo_rows               (cap,)               int32    padded row of each value
    cps_index              (cap,)               int32    CPS entries (a set of 4 rows, or a raw row)
    cpo_ptr / cps_vptr     (N*C*ncols + 1,)     int32    group g's values: [ptr[g], ptr[g + 1])
    cps_iptr               (N*C*ncols + 1,)     int32    group g's index entries (CPS only)

The kernels are written once for CPS's buffers (vals, index, vptr, iptr): CPO's rows are its
index entries, one row each, and its one pointer array serves values and entries, so its
kernels are CPS's signature without ``iptr`` (:func:`without_iptr`).

Weights (``wt``): [Mp/Mt][C][Kh][Kw][Mt] float32, Mt the M tile and Mp = M rounded up to a
multiple of it with zero filters (:func:`m_tiling`, :func:`weight_layout`).
"""
from __future__ import annotations

import numpy as np
import tvm

from ..conv import Conv2DSpec
from ..reference.cpo import column_order
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

    def cols_constant(self) -> np.ndarray:
        """int32 [cols_len]: ``cols``, zero-padded to one element when no column is kept."""
        out = np.zeros(self.cols_len, np.int32)
        out[:self.ncols] = self.cols
        return out


def without_iptr(func: tvm.tirx.PrimFunc, packed: bool) -> tvm.tirx.PrimFunc:
    """A kernel written with CPS's parameters, for CPO (packed=False) without ``iptr``: its
    body reads only ``vptr`` then, CPO's one pointer array (like base.drop_unused for bias/res)."""
    if packed:
        return func
    return tvm.tirx.PrimFunc([p for p in func.params if p.name != "iptr"], func.body, func.ret_type, func.attrs)
