"""halo-segment format (docs/algorithms.md section 7) in NumPy, exactly as the TIR encoder builds it.

B = ``block`` consecutive output pixels of one output row read, in each input row, the
L = (B-1)*Sw + (Kw-1)*Dw + 1 padded columns t*B*Sw .. t*B*Sw + L - 1 (segment t of that row,
t < ceil(Ow / B)). Per (n, real input row h, segment t), in that order, there is a pointer
range; per entry (ascending channel c) the channel and the L values of the segment; an entry
is stored when any of its values is non-zero. A value is the padded input, except that what no
output pixel reads is 0: rows no output row reads (e.g. between the rows of a strided 1x1),
columns past the last read one, offsets k of a segment that no (b, q) reads as b*Sw + q*Dw.
Arrays: ptr (N*H*nseg + 1,) int32, chan (nnz,) int32, val (nnz, L) float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..conv import Conv2DSpec
from .dense import is_nonzero, pad_input, read_mask
from .storage import Storage


@dataclass(frozen=True)
class HaloGeometry:
    """The static sizes of the format for one layer and block."""

    block: int       # B output pixels per group
    seg_len: int     # L values per entry
    step: int        # B*Sw padded columns between consecutive segments
    n_seg: int       # segments per input row: ceil(Ow / B)
    read_w: int      # padded columns [0, read_w) are read by some output pixel
    read_offsets: tuple[bool, ...]  # offset k of a segment is read by some (b, q)
    read_rows: tuple[bool, ...]     # real input row h is read by some (r, l)


def halo_geometry(spec: Conv2DSpec, block: int) -> HaloGeometry:
    (sh, sw), (dh, dw), pt = spec.stride, spec.dilation, spec.padding[0]
    kh, kw = spec.kernel_h, spec.kernel_w
    seg_len = (block - 1) * sw + (kw - 1) * dw + 1
    offsets = {b * sw + q * dw for b in range(block) for q in range(kw)}
    return HaloGeometry(block, seg_len, block * sw, -(-spec.out_w // block),
                        (spec.out_w - 1) * sw + (kw - 1) * dw + 1,
                        tuple(k in offsets for k in range(seg_len)),
                        tuple(bool(r) for r in read_mask(spec.height, pt, sh, dh, kh, spec.out_h)))


def halo_segments(spec: Conv2DSpec, x: np.ndarray, block: int) -> np.ndarray:
    """N x H x nseg x C x L: the values every (row, segment, channel) would store."""
    geo = halo_geometry(spec, block)
    pt = spec.padding[0]
    xp = pad_input(spec, np.asarray(x, np.float32))[:, :, pt:pt + spec.height, :geo.read_w]
    width = (geo.n_seg - 1) * geo.step + geo.seg_len
    xp = np.pad(xp, ((0, 0), (0, 0), (0, 0), (0, max(0, width - xp.shape[3]))))
    cols = np.arange(geo.n_seg)[:, None] * geo.step + np.arange(geo.seg_len)[None, :]
    seg = xp[:, :, :, cols]  # N, C, H, nseg, L
    seg = np.where(np.array(geo.read_offsets), seg, np.float32(0))  # unread offsets hold 0
    seg[:, :, ~np.array(geo.read_rows)] = 0
    return np.ascontiguousarray(seg.transpose(0, 2, 3, 1, 4))


def halo_encode(spec: Conv2DSpec, x: np.ndarray, block: int):
    """x: N x C x H x W -> (ptr, chan, val) as described in the module docstring."""
    seg = halo_segments(spec, x, block)
    stored = is_nonzero(seg).any(axis=4)  # N, H, nseg, C
    idx = np.nonzero(stored)  # (n, h, t) major, ascending channel
    ptr = np.zeros(stored[..., 0].size + 1, np.int32)
    np.cumsum(stored.sum(axis=3).reshape(-1), out=ptr[1:])
    return ptr, idx[3].astype(np.int32), seg[idx]


def halo_multiply(spec: Conv2DSpec, block: int, ptr, chan, val, w: np.ndarray) -> np.ndarray:
    """For each group of B pixels, kernel row l, entry (c, v) of the segment it reads, kernel
    column q and pixel b: O[b, :] += v[b*Sw + q*Dw] * W[:, c, l, q] (float64). -> N x M x Oh x Ow."""
    geo = halo_geometry(spec, block)
    n, h, oh, m = spec.batch, spec.height, spec.out_h, spec.out_channels
    (sh, sw), (dh, dw), pt = spec.stride, spec.dilation, spec.padding[0]
    ptr = np.asarray(ptr)
    nnz = int(ptr[-1])  # the compiled encoder's arrays are worst-case sized: use the valid prefix
    # the stored entries scattered back into their (n, h, t) segment lists
    seg = np.zeros((n * h * geo.n_seg, spec.in_channels, geo.seg_len))
    seg[np.repeat(np.arange(ptr.size - 1), np.diff(ptr)), np.asarray(chan)[:nnz]] = \
        np.asarray(val, np.float64)[:nnz]
    seg = np.concatenate([seg.reshape(n, h, geo.n_seg, spec.in_channels, geo.seg_len),
                          np.zeros((n, 1, geo.n_seg, spec.in_channels, geo.seg_len))], axis=1)  # row h: zeros
    out = np.zeros((n, oh, geo.n_seg, block, m))
    with np.errstate(invalid="ignore", over="ignore"):
        for l in range(spec.kernel_h):
            rows = np.arange(oh) * sh + l * dh - pt
            rows = np.where((rows >= 0) & (rows < h), rows, h)  # padding rows read the zero row
            for q in range(spec.kernel_w):
                v = seg[:, rows][..., np.arange(block) * sw + q * dw]  # n, r, t, c, b
                out += np.einsum("nrtcb,mc->nrtbm", v, w[:, :, l, q].astype(np.float64))
    out = out.reshape(n, oh, geo.n_seg * block, m)[:, :, :spec.out_w]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)).astype(np.float32)


def halo_storage(spec: Conv2DSpec, block: int, ptr: np.ndarray) -> Storage:
    """L float32 values + one int32 channel per stored entry, plus the int32 pointers."""
    nnz = int(np.asarray(ptr)[-1])
    geo = halo_geometry(spec, block)
    return Storage.of((nnz * geo.seg_len, 4), (nnz, 4), (np.asarray(ptr).size, 4))
