"""pixcsr format in NumPy: the CSR of the input's pixels, channel-blocked, exactly as the TIR encoder builds it.

Channels are cut into blocks of ``c_block`` = cb (the last block may be short): per (n, real
input row h, block kb, column j), in that order, a pointer range; per entry (ascending channel)
the code j*cb + (c - kb*cb) and the value x[n, c, h, j]. An entry is stored when the value is
non-zero and the pixel is read by some output pixel (rows and columns that a strided or
dilated conv skips are never stored). Every non-zero is stored once.
Arrays: ptr (N*H*nkb*W + 1,) int32, code (nnz,) int32, val (nnz,) float32.

The multiply is a direct convolution over the stored entries: output pixel (r, s) reads, in
kernel row l, input row i = r*Sh + l*Dh - pt, columns j = s*Sw - pl + q*Dw, i.e. the entries of
the pointer ranges of (n, i, kb, j) for every block kb, weight (c, l, q).
"""
from __future__ import annotations

import numpy as np

from ..conv import Conv2DSpec
from .dense import dense_conv2d, is_nonzero, read_mask
from .storage import Storage


def pixcsr_blocks(spec: Conv2DSpec, c_block: int) -> int:
    return -(-spec.in_channels // c_block)


def pixcsr_encode(spec: Conv2DSpec, x: np.ndarray, c_block: int):
    """x: N x C x H x W -> (ptr, code, val) as described in the module docstring."""
    n, c, h, w = spec.x_shape
    nkb = pixcsr_blocks(spec, c_block)
    x = np.asarray(x, np.float32)
    rows = read_mask(h, spec.padding[0], spec.stride[0], spec.dilation[0], spec.kernel_h, spec.out_h)
    cols = read_mask(w, spec.padding[1], spec.stride[1], spec.dilation[1], spec.kernel_w, spec.out_w)
    xp = np.zeros((n, nkb * c_block, h, w), np.float32)
    xp[:, :c] = x
    stored = is_nonzero(xp) & rows[None, None, :, None] & cols[None, None, None, :]
    xb = xp.reshape(n, nkb, c_block, h, w).transpose(0, 3, 1, 4, 2)  # n, h, kb, j, cc
    sb = stored.reshape(n, nkb, c_block, h, w).transpose(0, 3, 1, 4, 2)
    idx = np.nonzero(sb)  # (n, h, kb, j) major, ascending channel
    ptr = np.zeros(sb[..., 0].size + 1, np.int32)
    np.cumsum(sb.sum(axis=4).reshape(-1), out=ptr[1:])
    return ptr, (idx[3] * c_block + idx[4]).astype(np.int32), xb[idx]


def pixcsr_decode(spec: Conv2DSpec, c_block: int, ptr, code, val) -> np.ndarray:
    """The stored entries put back into an N x C x H x W array (float64; not stored = 0)."""
    n, c, h, w = spec.x_shape
    nkb = pixcsr_blocks(spec, c_block)
    ptr = np.asarray(ptr)
    nnz = int(ptr[-1])  # the compiled encoder's arrays are worst-case sized: use the valid prefix
    row = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))  # ((n*H + h)*nkb + kb)*W + j
    code = np.asarray(code)[:nnz]
    kb, img = row // w % nkb, row // (w * nkb)
    x = np.zeros((n * h, nkb * c_block, w))
    x[img, kb * c_block + code % c_block, code // c_block] = np.asarray(val, np.float64)[:nnz]
    return x.reshape(n, h, -1, w).transpose(0, 2, 1, 3)[:, :c]


def pixcsr_multiply(spec: Conv2DSpec, c_block: int, ptr, code, val, w: np.ndarray) -> np.ndarray:
    """The direct convolution of the stored entries (float64) -> N x M x Oh x Ow float32."""
    return dense_conv2d(spec, pixcsr_decode(spec, c_block, ptr, code, val), np.asarray(w))


def pixcsr_storage(spec: Conv2DSpec, ptr: np.ndarray) -> Storage:
    """One float32 value + one int32 code per stored entry, plus the int32 pointers."""
    nnz = int(np.asarray(ptr)[-1])
    return Storage.of((nnz, 4), (nnz, 4), (np.asarray(ptr).size, 4))
