"""NumPy reference of CPO and CPS (Amer et al.): encoders, CPS decoder, multiplies, storage.

Both formats cover the whole batch and store every NZE of the activation exactly once.

Column order (static, from the layer alone): the padded columns j that lie in at least
one window, ordered by overlap type, then by j. The overlap type of j is the number of
(output column s, kernel column q) pairs it takes part in, i.e. of q with
j - q*Dw = s*Sw, 0 <= s < Ow (Kw - |t| of the paper's t(j) at stride 1). **(design)**
Padding columns are left out too: they hold no NZE, so keeping them would only cost
pointers. ``cols[k]`` is the padded column at position k; ``ncols = len(cols)``.

CPO, per (image n, channel c, position k), the NZEs of column cols[k] by ascending
padded row i:
  values float32 [nnz], rows int32 [nnz] (padded row i),
  ptr int32 [N*C*ncols + 1]: column (n, c, k) is values[ptr[g]:ptr[g+1]], g = (n*C + c)*ncols + k.

CPS: the same traversal, values and value pointers (``vptr`` == CPO's ptr); the rows of
each column are cut into aligned sets of 4 padded rows {4b .. 4b+3}. A set with 3 or 4
NZEs is one int32 entry ``FLAG | (4b << 4) | mask`` (FLAG = the sign bit, bit t of the
mask = row 4b + t is non-zero), a set with 1 or 2 NZEs is its raw rows (>= 0), an empty
set is nothing; ``iptr`` [N*C*ncols + 1] points into the entries like ptr into the values.
The entries of a column are in ascending row order, so decoding them in order yields the
column's values in order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..conv import Conv2DSpec
from .dense import is_nonzero, pad_input
from .storage import Storage

CPS_FLAG = np.int32(-2 ** 31)  # top bit: this entry is (base row, mask)
CPS_BASE_MASK = 0x07FFFFFF  # base row after >> 4, with the sign bits cleared
CPS_SET = 4


def column_types(spec: Conv2DSpec) -> np.ndarray:
    """Wp ints: the number of (output column, kernel column) pairs each padded column is in."""
    (sw, dw), kw, ow = (spec.stride[1], spec.dilation[1]), spec.kernel_w, spec.out_w
    d = np.arange(spec.padded_w)[:, None] - np.arange(kw)[None, :] * dw  # j - q*Dw
    return ((d >= 0) & (d % sw == 0) & (d // sw < ow)).sum(axis=1)


def column_order(spec: Conv2DSpec) -> np.ndarray:
    """int32 [ncols]: the kept padded columns (real input columns in some window) by (type, j)."""
    t = column_types(spec)
    pl = spec.padding[1]
    j = np.arange(pl, pl + spec.width)
    j = j[t[j] > 0]
    return j[np.lexsort((j, t[j]))].astype(np.int32)


@dataclass
class CPO:
    values: np.ndarray  # float32 [nnz]
    rows: np.ndarray  # int32 [nnz], padded row of each value
    ptr: np.ndarray  # int32 [N*C*ncols + 1]
    cols: np.ndarray  # int32 [ncols], the static column order


@dataclass
class CPS:
    values: np.ndarray  # float32 [nnz], as CPO
    index: np.ndarray  # int32 [entries]: raw rows (>= 0) or FLAG | base << 4 | mask
    vptr: np.ndarray  # int32 [N*C*ncols + 1] into values (CPO's ptr)
    iptr: np.ndarray  # int32 [N*C*ncols + 1] into index
    cols: np.ndarray


def cpo_encode(spec: Conv2DSpec, x: np.ndarray) -> CPO:
    """N x C x H x W activation -> CPO (same arrays and order as the compiled encoder)."""
    cols = column_order(spec)
    xp = pad_input(spec, np.asarray(x, np.float32))[:, :, :, cols]  # N, C, Hp, ncols
    xt = np.ascontiguousarray(xp.transpose(0, 1, 3, 2))  # N, C, ncols, Hp: column-major order
    nz = is_nonzero(xt)
    counts = nz.sum(axis=3).reshape(-1)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rows = np.nonzero(nz)[3].astype(np.int32)  # C order: (n, c, k, i), i ascending
    return CPO(xt[nz].astype(np.float32), rows, ptr, cols)


def _cps_column(rows: np.ndarray) -> list[int]:
    """The CPS index entries of one column's ascending padded rows."""
    out = []
    sets = rows // CPS_SET
    for b in np.unique(sets):
        r = rows[sets == b]
        if len(r) >= 3:
            mask = int(np.bitwise_or.reduce(1 << (r - CPS_SET * b)))
            out.append(int(CPS_FLAG) | (int(CPS_SET * b) << 4) | mask)
        else:
            out.extend(int(i) for i in r)
    return out


def cps_encode(spec: Conv2DSpec, x: np.ndarray) -> CPS:
    """N x C x H x W activation -> CPS (same arrays and order as the compiled encoder)."""
    cpo = cpo_encode(spec, x)
    entries, iptr = [], [0]
    for g in range(len(cpo.ptr) - 1):
        entries += _cps_column(cpo.rows[cpo.ptr[g]:cpo.ptr[g + 1]])
        iptr.append(len(entries))
    return CPS(cpo.values, np.array(entries, np.int64).astype(np.int32),
               cpo.ptr, np.array(iptr, np.int32), cpo.cols)


def cps_decode_entry(e: int) -> list[int]:
    """Padded rows of one CPS entry."""
    e = int(np.int32(e))
    if e >= 0:
        return [e]
    base, mask = (e >> 4) & CPS_BASE_MASK, e & 0xF
    return [base + t for t in range(CPS_SET) if mask >> t & 1]


def cps_decode(spec: Conv2DSpec, cps: CPS) -> CPO:
    """CPS -> the CPO it encodes (rows expanded; values and pointers are shared)."""
    rows = []
    for g in range(len(cps.iptr) - 1):
        col = [i for e in cps.index[cps.iptr[g]:cps.iptr[g + 1]] for i in cps_decode_entry(e)]
        if len(col) != cps.vptr[g + 1] - cps.vptr[g]:
            raise ValueError(f"CPS column {g}: {len(col)} decoded rows for "
                             f"{cps.vptr[g + 1] - cps.vptr[g]} values")
        rows += col
    return CPO(cps.values, np.array(rows, np.int32), cps.vptr, cps.cols)


def cpo_multiply(spec: Conv2DSpec, cpo: CPO, w: np.ndarray) -> np.ndarray:
    """Scatter every stored NZE into the outputs it feeds -> N x M x Oh x Ow float32.

    For v at (n, c, i, j): for each (l, q) with i - l*Dh = r*Sh, j - q*Dw = s*Sw inside the
    output, y[n, :, r, s] += v * w[:, c, l, q]. Accumulated in float64.
    """
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    n_, c_, oh, ow, m_ = spec.batch, spec.in_channels, spec.out_h, spec.out_w, spec.out_channels
    ncols = len(cpo.cols)
    g = np.repeat(np.arange(n_ * c_ * ncols), np.diff(cpo.ptr))  # column of each NZE
    n, c, j = g // (c_ * ncols), g // ncols % c_, cpo.cols[g % ncols]
    i, v = cpo.rows.astype(np.int64), cpo.values.astype(np.float64)
    wk = w.astype(np.float64)
    y = np.zeros((n_ * oh * ow, m_), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for l in range(spec.kernel_h):
            for q in range(spec.kernel_w):
                di, dj = i - l * dh, j - q * dw
                r, s = di // sh, dj // sw
                ok = (di >= 0) & (di % sh == 0) & (r < oh) & (dj >= 0) & (dj % sw == 0) & (s < ow)
                np.add.at(y, (n[ok] * oh + r[ok]) * ow + s[ok], v[ok, None] * wk[:, c[ok], l, q].T)
    return y.reshape(n_, oh, ow, m_).transpose(0, 3, 1, 2).astype(np.float32)


def cps_multiply(spec: Conv2DSpec, cps: CPS, w: np.ndarray) -> np.ndarray:
    """Decode, then scatter as CPO."""
    return cpo_multiply(spec, cps_decode(spec, cps), w)


def cpo_storage(cpo: CPO) -> Storage:
    """values + rows + pointers + the column order (once)."""
    return Storage.of(cpo.values, cpo.rows, cpo.ptr, cpo.cols)


def cps_storage(cps: CPS) -> Storage:
    """values + index entries + value pointers + index pointers + the column order (once)."""
    return Storage.of(cps.values, cps.index, cps.vptr, cps.iptr, cps.cols)
