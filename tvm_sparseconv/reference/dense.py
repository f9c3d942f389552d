"""Dense conv2d in NumPy: the oracle every algorithm is tested against."""
from __future__ import annotations

import numpy as np

from ..conv import HARD_SIGMOID, Conv2DSpec


def is_nonzero(a: np.ndarray) -> np.ndarray:
    """The non-zero test every encoder uses: -0.0 is zero, NaN and Inf are non-zeros."""
    return a != 0


def pad_input(spec: Conv2DSpec, x: np.ndarray) -> np.ndarray:
    """N x C x H x W -> N x C x Hp x Wp with zeros (padding is top, left, bottom, right)."""
    pt, pl, pb, pr = spec.padding
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))


def read_mask(size: int, pad: int, stride: int, dilation: int, kernel: int, out: int) -> np.ndarray:
    """Bool (size,): real input index i is read by some output index o and tap k (i = o*S + k*D - pad)."""
    read = np.zeros(size, bool)
    for k in range(kernel):
        idx = np.arange(out) * stride + k * dilation - pad
        read[idx[(idx >= 0) & (idx < size)]] = True
    return read


def dense_conv2d(spec: Conv2DSpec, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None,
                 relu: bool = False, residual: np.ndarray | None = None, clip: float | None = None,
                 gate: str | None = None, slope: float | None = None) -> np.ndarray:
    """Direct convolution, accumulated in float64, returned as float32 N x M x Oh x Ow.

    x: N x C x H x W, w: M x C/G x Kh x Kw, bias: M, residual: N x M x Oh x Ow. The epilogue is
    conv.Epilogue's, in its order (docs/algorithms.md 12): + bias, + residual, max(., 0) with
    ``relu`` (y * slope below 0 with ``slope``), min(., clip), or y * gate_of(y) with ``gate``.
    NaN and Inf propagate as in any dense convolution (0 * Inf = NaN where a padded or zero
    input meets an Inf weight), and NaN passes the bounds.
    """
    assert x.shape == spec.x_shape and w.shape == spec.w_shape, (x.shape, w.shape, spec)
    xp = pad_input(spec, x.astype(np.float64))
    (sh, sw), (dh, dw), g = spec.stride, spec.dilation, spec.groups
    oh, ow = spec.out_h, spec.out_w
    cg, mg = spec.in_channels // g, spec.out_channels // g
    y = np.zeros((spec.batch, spec.out_channels, oh, ow), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for gi in range(g):
            xs = xp[:, gi * cg:(gi + 1) * cg]
            ws = w[gi * mg:(gi + 1) * mg].astype(np.float64)
            for l in range(spec.kernel_h):
                for q in range(spec.kernel_w):
                    patch = xs[:, :, l * dh: l * dh + (oh - 1) * sh + 1: sh, q * dw: q * dw + (ow - 1) * sw + 1: sw]
                    # tensordot goes to BLAS (a plain einsum here takes minutes on a VGG layer)
                    y[:, gi * mg:(gi + 1) * mg] += np.tensordot(ws[:, :, l, q], patch, axes=([1], [1])).transpose(1, 0, 2, 3)
        if bias is not None:
            y += bias.astype(np.float64)[None, :, None, None]
        if residual is not None:
            assert residual.shape == y.shape, (residual.shape, y.shape)
            y += residual.astype(np.float64)
        if relu:
            # NaN stays NaN, as select(v < 0, 0, v) in the kernels
            y = np.where(y < 0, 0.0 if slope is None else y * slope, y)
        if clip is not None:
            y = np.where(y > clip, float(clip), y)
        if gate is not None:
            y = y * gate_of(y, gate)
        return y.astype(np.float32)


def gate_of(y: np.ndarray, gate: str) -> np.ndarray:
    """conv.Epilogue's gate of y in float64: the hard sigmoid clip(y a + b, 0, 1) or the
    sigmoid 1 / (1 + e^-y); NaN stays NaN."""
    if gate == "hard_sigmoid":
        a, b = HARD_SIGMOID
        return np.clip(y * a + b, 0.0, 1.0)
    if gate == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-y))
    raise ValueError(f"unknown gate {gate!r} (conv.GATES)")
