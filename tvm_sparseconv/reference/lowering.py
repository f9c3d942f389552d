"""Dense lowerings: im2col and MEC (Cho & Brand), with their GEMMs."""
from __future__ import annotations

import numpy as np

from ..conv import Conv2DSpec
from .dense import pad_input


def im2col_lower(spec: Conv2DSpec, x: np.ndarray) -> np.ndarray:
    """N x C x H x W -> A: N x (C*Kh*Kw) x (Oh*Ow), row (c, l, q), padded positions 0. groups=1."""
    xp = pad_input(spec, x)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    oh, ow = spec.out_h, spec.out_w
    cols = [xp[:, :, l * dh: l * dh + (oh - 1) * sh + 1: sh, q * dw: q * dw + (ow - 1) * sw + 1: sw]
            for l in range(spec.kernel_h) for q in range(spec.kernel_w)]
    a = np.stack(cols, axis=2)  # N, C, Kh*Kw, Oh, Ow
    return a.reshape(spec.batch, spec.in_channels * spec.kernel_h * spec.kernel_w, oh * ow)


def im2col_multiply(spec: Conv2DSpec, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A: N x (C*Kh*Kw) x (Oh*Ow), w: M x C x Kh x Kw -> N x M x Oh x Ow."""
    wm = w.reshape(spec.out_channels, -1).astype(np.float64)
    y = np.einsum("mk,nkp->nmp", wm, a.astype(np.float64), optimize=True)
    return y.reshape(spec.y_shape).astype(np.float32)


def mec_lower(spec: Conv2DSpec, x: np.ndarray) -> np.ndarray:
    """N x C x H x W -> L: N x Ow x Hp x Kw x C, L[n, w, h, q, c] = Xpad[n, c, h, w*Sw + q*Dw].

    Flattened per row as (h, q, c), this is MEC's Ow x (Hp*Kw*C) lowered matrix.
    """
    xp = pad_input(spec, x)
    sw, dw = spec.stride[1], spec.dilation[1]
    ow = spec.out_w
    strips = [xp[:, :, :, q * dw: q * dw + (ow - 1) * sw + 1: sw] for q in range(spec.kernel_w)]  # N,C,Hp,Ow
    s = np.stack(strips, axis=0)  # Kw, N, C, Hp, Ow
    return np.ascontiguousarray(s.transpose(1, 4, 3, 0, 2))  # N, Ow, Hp, Kw, C


def mec_multiply(spec: Conv2DSpec, lowered: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Oh small GEMMs over overlapping row windows of L: O[r] = L[:, r*Sh + l*Dh] x K'[l]."""
    sh, dh = spec.stride[0], spec.dilation[0]
    wk = w.transpose(2, 3, 1, 0).astype(np.float64)  # Kh, Kw, C, M
    y = np.zeros((spec.batch, spec.out_channels, spec.out_h, spec.out_w), np.float64)
    for r in range(spec.out_h):
        for l in range(spec.kernel_h):
            y[:, :, r, :] += np.einsum("nwqc,qcm->nmw", lowered[:, :, r * sh + l * dh].astype(np.float64), wk[l],
                                       optimize=True)
    return y.astype(np.float32)
