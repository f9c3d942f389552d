"""im2CSR in NumPy: the CSR of the (row-blocked) im2col matrix, exactly as the TIR encoder builds it.

Row g = (n, r, sb) is a group of B consecutive output pixels s = sb*B + b of output row r
(rows ordered n, r, sb; pixels s >= Ow read 0); column k = (c*Kh + l)*Kw + q; the entry holds
Xpad[n, c, r*Sh + l*Dh, s*Sw + q*Dw] for the B pixels and is stored when any is non-zero.
B = 1 is plain im2CSR. Arrays: ptr (rows + 1,) int32, col (nnz,) int32 ascending within a
row, val (nnz, B) float32.
"""
from __future__ import annotations

import numpy as np

from ..conv import Conv2DSpec
from .dense import is_nonzero
from .lowering import im2col_lower
from .storage import Storage


def _blocked_lowered(spec: Conv2DSpec, x: np.ndarray, block: int) -> np.ndarray:
    """rows x (C*Kh*Kw) x B: the im2col matrix with each row block of B pixels as one row."""
    n, oh, ow = spec.batch, spec.out_h, spec.out_w
    per_row = -(-ow // block)
    a = im2col_lower(spec, np.asarray(x, np.float32)).reshape(n, -1, oh, ow)
    a = np.pad(a, ((0, 0), (0, 0), (0, 0), (0, per_row * block - ow)))
    a = a.reshape(n, a.shape[1], oh, per_row, block).transpose(0, 2, 3, 1, 4)
    return a.reshape(n * oh * per_row, a.shape[3], block)


def im2csr_encode(spec: Conv2DSpec, x: np.ndarray, block: int = 1):
    """x: N x C x H x W -> (ptr, col, val) as described in the module docstring."""
    a = _blocked_lowered(spec, x, block)
    stored = is_nonzero(a).any(axis=2)
    rows, cols = np.nonzero(stored)  # row-major: rows ascending, columns ascending within a row
    ptr = np.zeros(a.shape[0] + 1, np.int32)
    np.cumsum(stored.sum(axis=1), out=ptr[1:])
    return ptr, cols.astype(np.int32), a[rows, cols]


def im2csr_multiply(spec: Conv2DSpec, block: int, ptr, col, val, w: np.ndarray) -> np.ndarray:
    """O[pixel, M] = CSR x W[C*Kh*Kw, M] (float64), returned as N x M x Oh x Ow float32."""
    ptr = np.asarray(ptr)
    nnz = int(ptr[-1])  # the compiled encoder's arrays are worst-case sized: use the valid prefix
    col, val = np.asarray(col)[:nnz], np.asarray(val, np.float64)[:nnz]
    n_rows = ptr.size - 1
    rows = np.repeat(np.arange(n_rows), np.diff(ptr))
    wr = w.reshape(spec.out_channels, -1).T.astype(np.float64)  # [C*Kh*Kw][M]
    a = np.zeros((n_rows, wr.shape[0], block))  # the stored entries scattered back into their rows
    a[rows, col] = val
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.einsum("gkb,km->gbm", a, wr)
    n, oh, ow = spec.batch, spec.out_h, spec.out_w
    out = out.reshape(n, oh, -1, spec.out_channels)[:, :, :ow]  # n, r, s, m
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)).astype(np.float32)


def im2csr_storage(spec: Conv2DSpec, block: int, ptr: np.ndarray) -> Storage:
    """B float32 values + one int32 column per stored entry, plus the int32 row pointers."""
    nnz = int(np.asarray(ptr)[-1])
    return Storage.of((nnz * block, 4), (nnz, 4), (np.asarray(ptr).size, 4))
