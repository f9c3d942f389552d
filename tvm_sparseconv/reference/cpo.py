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

CPS: the same traversal and values; the rows of each column are cut into aligned sets of 4
padded rows {4b .. 4b+3}, and each non-empty set is one int32 entry followed by its values
(their float32 bits) in one int32 stream:
  - 2-4 NZEs: ``FLAG | (4b << 4) | mask`` (FLAG = the sign bit, bit t of the mask = row
    4b + t is non-zero), then the popcount(mask) values by ascending row;
  - 1 NZE: its raw padded row (>= 0), then its value.
  stream int32 [entries + nnz], ptr int32 [N*C*ncols + 1]: group g is stream[ptr[g]:ptr[g+1]].
**(design)** The paper keeps the values and the entries in two arrays, so each group needs a
pointer into each; one interleaved stream needs one pointer array, and a set is packed from 2
NZEs on (the paper: from 3). Then CPS stores entries + nnz + (groups + 1) + ncols elements,
at most CPO's 2*nnz + (groups + 1) + ncols (equal only when no set holds 2 NZEs or more), on
every input; an all-zero input stores the pointers and the column order alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..conv import Conv2DSpec
from .dense import is_nonzero, pad_input
from .storage import Storage

CPS_FLAG = np.int32(-2 ** 31)  # top bit: this entry is (base row, mask)
CPS_BASE_MASK = 0x07FFFFFF  # base row after >> 4, with the sign bits cleared
CPS_SET = 4  # padded rows per set
CPS_PACK = 2  # a set with this many NZEs or more is one flagged entry; a single NZE stays a raw row


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
    stream: np.ndarray  # int32 [entries + nnz]: each entry, then its values' float32 bits
    ptr: np.ndarray  # int32 [N*C*ncols + 1] into stream
    cols: np.ndarray  # int32 [ncols], as CPO


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


def cps_encode(spec: Conv2DSpec, x: np.ndarray) -> CPS:
    """N x C x H x W activation -> CPS (same arrays and order as the compiled encoder)."""
    cpo = cpo_encode(spec, x)
    rows, nnz, groups = cpo.rows.astype(np.int64), len(cpo.rows), len(cpo.ptr) - 1
    g = np.repeat(np.arange(groups), np.diff(cpo.ptr))  # group of each NZE
    b = rows // CPS_SET  # set of each NZE
    first = np.ones(nnz, bool)  # the first NZE of each (group, set)
    first[1:] = (g[1:] != g[:-1]) | (b[1:] != b[:-1])
    starts = np.flatnonzero(first)  # NZEs before each set, in storage order
    sets = len(starts)
    count = np.diff(np.append(starts, nnz))
    mask = np.bitwise_or.reduceat(1 << (rows - CPS_SET * b), starts) if sets else np.zeros(0, np.int64)
    entries = np.where(count >= CPS_PACK, int(CPS_FLAG) | (CPS_SET * b[starts]) << 4 | mask, rows[starts])
    # set s starts at stream position starts[s] + s (the NZEs and the entries before it)
    stream = np.empty(nnz + sets, np.int32)
    stream[starts + np.arange(sets)] = entries.astype(np.int32)
    stream[np.arange(nnz) + np.cumsum(first)] = cpo.values.view(np.int32)  # NZE i: after i NZEs and the entries up to its set's
    per_group = np.bincount(g[starts], minlength=groups)
    ptr = (cpo.ptr + np.concatenate([[0], np.cumsum(per_group)])).astype(np.int32)
    return CPS(stream, ptr, cpo.cols)


def cps_entry_rows(e: int) -> list[int]:
    """Padded rows of one CPS entry (ascending)."""
    e = int(np.int32(e))
    if e >= 0:
        return [e]
    base, mask = (e >> 4) & CPS_BASE_MASK, e & 0xF
    return [base + t for t in range(CPS_SET) if mask >> t & 1]


def cps_decode(spec: Conv2DSpec, cps: CPS) -> CPO:
    """CPS -> the CPO it encodes (rows and values unpacked from the stream, CPO's pointers).

    Raises ValueError on a malformed stream: a flagged entry without rows, or an entry whose
    values run past its group."""
    rows, at, counts = [], [], []
    for g in range(len(cps.ptr) - 1):
        p, end, n = int(cps.ptr[g]), int(cps.ptr[g + 1]), 0
        while p < end:
            r = cps_entry_rows(cps.stream[p])
            if not r or p + 1 + len(r) > end:
                raise ValueError(f"CPS group {g}: entry {int(cps.stream[p]):#x} at {p} has {len(r)} rows, "
                                 f"the group ends at {end}")
            rows += r
            at += range(p + 1, p + 1 + len(r))
            p, n = p + 1 + len(r), n + len(r)
        counts.append(n)
    ptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32)
    values = cps.stream[np.array(at, np.int64)].view(np.float32)
    return CPO(values, np.array(rows, np.int32), ptr, cps.cols)


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
    """the stream (entries and values) + pointers + the column order (once)."""
    return Storage.of(cps.stream, cps.ptr, cps.cols)
