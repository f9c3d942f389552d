"""NumPy twins of the layout transforms (layout.py): NCHW to and from channel blocks."""
from __future__ import annotations

import numpy as np

from ..layout import channel_block


def to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """N x C x H x W -> ``layout``: itself for "nchw"; for "nchw{cb}c" N x ceil(C/cb) x H x W x cb
    with channel c at [:, c // cb, :, :, c % cb] and zeros past C."""
    cb = channel_block(layout)
    if cb == 0:
        return a
    n, c, h, w = a.shape
    nb = -(-c // cb)
    out = np.zeros((n, nb * cb, h, w), a.dtype)
    out[:, :c] = a
    return np.ascontiguousarray(out.reshape(n, nb, cb, h, w).transpose(0, 1, 3, 4, 2))


def from_layout(a: np.ndarray, layout: str, channels: int) -> np.ndarray:
    """The inverse of to_layout: the N x ``channels`` x H x W tensor held in ``layout``."""
    cb = channel_block(layout)
    if cb == 0:
        return a
    n, nb, h, w, _ = a.shape
    return np.ascontiguousarray(a.transpose(0, 1, 4, 2, 3).reshape(n, nb * cb, h, w)[:, :channels])
