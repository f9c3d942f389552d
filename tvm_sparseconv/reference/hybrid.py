"""hybrid format in NumPy: halo segments where a channel's segment is dense, its single
non-zeros where it is sparse; exactly as the TIR encoder builds it.

The segments are halo's (reference/halo.py: block B, L values per (n, h, t, c), unread
offsets 0). Offset o of a segment is used by reads[o] = #{(b, q): b*Sw + q*Dw = o} of the
B*Kw (pixel, kernel column) products of a group; a channel's segment feeds
pairs = sum over its non-zero offsets of reads[o] of them. It is stored

- as a halo entry (channel c, its L values) when pairs >= ``dense_from``: the multiply then
  does all B*Kw products, each loaded weight vector serving B pixels;
- otherwise as one pixel entry per non-zero offset o: code c*Kw + o and the value; the
  multiply does exactly the pairs products, each loading its own weight vector.

Channels are cut into blocks of ``c_block`` = cb (nkb = ceil(C / cb) blocks). Arrays: halo part
hptr (N*H*nkb*nseg + 1,) int32 (a range per (n, h, kb, t)), hchan (nh,) int32, hval (L, nh)
float32 (offset-major: the encoder writes each offset's values with one compress store); pixel part pptr (N*H*nkb*nseg*L + 1,) int32 (a range per (n, h, kb, t, o)),
pcode (np,) int32, pval (np,) float32; ascending channel within a range.
The code c*Kw + o is chosen so that pixel b reads weight row c*Kw + q = code - b*Sw when Dw = 1
(o = b*Sw + q), one subtraction per entry.
"""
from __future__ import annotations

import numpy as np

from ..conv import Conv2DSpec
from .dense import is_nonzero
from .halo import halo_geometry, halo_multiply, halo_segments
from .storage import Storage


def offset_reads(spec: Conv2DSpec, block: int) -> tuple[int, ...]:
    """reads[o]: how many (pixel b, kernel column q) of a group read offset o of its segment."""
    (_, sw), (_, dw) = spec.stride, spec.dilation
    reads = [0] * halo_geometry(spec, block).seg_len
    for b in range(block):
        for q in range(spec.kernel_w):
            reads[b * sw + q * dw] += 1
    return tuple(reads)


def _blocked(a: np.ndarray, c_block: int) -> np.ndarray:
    """N x H x nseg x C [x ...] -> N x H x nkb x nseg x c_block [x ...] (channels zero-padded)."""
    n, h, nseg, c = a.shape[:4]
    nkb = -(-c // c_block)
    a = np.pad(a, [(0, 0)] * 3 + [(0, nkb * c_block - c)] + [(0, 0)] * (a.ndim - 4))
    return np.moveaxis(a.reshape(n, h, nseg, nkb, c_block, *a.shape[4:]), 3, 2)


def hybrid_encode(spec: Conv2DSpec, x: np.ndarray, block: int, c_block: int, dense_from: int):
    """x: N x C x H x W -> (hptr, hchan, hval, pptr, pcode, pval) as in the module docstring."""
    seg = _blocked(halo_segments(spec, x, block), c_block)  # N, H, nkb, nseg, cb, L
    nz = is_nonzero(seg)
    dense = (nz * np.array(offset_reads(spec, block))).sum(axis=5) >= dense_from  # N, H, nkb, nseg, cb
    hstored = dense & nz.any(axis=5)
    hidx = np.nonzero(hstored)  # (n, h, kb, t) major, ascending channel
    hptr = np.zeros(hstored[..., 0].size + 1, np.int32)
    np.cumsum(hstored.sum(axis=4).reshape(-1), out=hptr[1:])
    pstored = np.moveaxis(nz & ~dense[..., None], 5, 4)  # N, H, nkb, nseg, L, cb
    pidx = np.nonzero(pstored)  # (n, h, kb, t, o) major, ascending channel
    pptr = np.zeros(pstored[..., 0].size + 1, np.int32)
    np.cumsum(pstored.sum(axis=5).reshape(-1), out=pptr[1:])
    chan = lambda kb, cc: (kb * c_block + cc).astype(np.int32)
    pcode = chan(pidx[2], pidx[5]) * spec.kernel_w + pidx[4]
    pval = seg[pidx[0], pidx[1], pidx[2], pidx[3], pidx[5], pidx[4]]
    return hptr, chan(hidx[2], hidx[4]), np.ascontiguousarray(seg[hidx].T), pptr, pcode.astype(np.int32), pval


def hybrid_segments(spec: Conv2DSpec, block: int, c_block: int, hptr, hchan, hval, pptr, pcode,
                    pval) -> np.ndarray:
    """The stored entries of both parts put back into (N*H*nseg, C, L) segments (float64)."""
    geo = halo_geometry(spec, block)
    n, h, c, L, kw = spec.batch, spec.height, spec.in_channels, geo.seg_len, spec.kernel_w
    nkb = -(-c // c_block)
    seg = np.zeros((n * h, geo.n_seg, c, L))
    hptr, pptr = np.asarray(hptr), np.asarray(pptr)
    nh, npx = int(hptr[-1]), int(pptr[-1])  # the compiled arrays are worst-case sized: valid prefix
    row = np.repeat(np.arange(hptr.size - 1), np.diff(hptr))  # ((n*H + h)*nkb + kb)*nseg + t
    seg[row // (nkb * geo.n_seg), row % geo.n_seg, np.asarray(hchan)[:nh]] = np.asarray(hval, np.float64)[:, :nh].T
    row = np.repeat(np.arange(pptr.size - 1), np.diff(pptr))  # (((n*H + h)*nkb + kb)*nseg + t)*L + o
    o, row = row % L, row // L
    seg[row // (nkb * geo.n_seg), row % geo.n_seg, (np.asarray(pcode)[:npx] - o) // kw, o] = \
        np.asarray(pval, np.float64)[:npx]
    return seg.reshape(-1, c, L)


def hybrid_multiply(spec: Conv2DSpec, block: int, c_block: int, hptr, hchan, hval, pptr, pcode, pval,
                    w) -> np.ndarray:
    """Both parts as one halo encoding with every (segment, channel) stored, then halo's
    reference multiply -> N x M x Oh x Ow float32."""
    seg = hybrid_segments(spec, block, c_block, hptr, hchan, hval, pptr, pcode, pval)
    n_seg, C, L = seg.shape
    ptr = np.arange(n_seg + 1, dtype=np.int64) * C
    return halo_multiply(spec, block, ptr, np.tile(np.arange(C), n_seg), seg.reshape(-1, L), w)


def hybrid_storage(spec: Conv2DSpec, block: int, hptr, pptr) -> Storage:
    """Halo entries: L float32 values + an int32 channel; pixel entries: a float32 value + an
    int32 code; plus both int32 pointer arrays."""
    nh, npx = int(np.asarray(hptr)[-1]), int(np.asarray(pptr)[-1])
    L = halo_geometry(spec, block).seg_len
    return Storage.of((nh * L, 4), (nh, 4), (npx, 4), (npx, 4), (np.asarray(hptr).size, 4),
                      (np.asarray(pptr).size, 4))
