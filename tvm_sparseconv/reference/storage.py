"""Memory accounting: stored elements and bytes of a representation, and compression ratios.

Specified in docs/algorithms.md section 0.5.

As in the CPO/CPS authors' code, CR_X = (N*Oh*Ow*Kh*Kw*C) / (stored elements of X), every
value, index and pointer counted once; the byte count uses the real dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..conv import Conv2DSpec


@dataclass(frozen=True)
class Storage:
    """Size of one representation of a layer's input: values + indices + pointers."""

    elements: int
    bytes: int

    def __add__(self, other: "Storage") -> "Storage":
        return Storage(self.elements + other.elements, self.bytes + other.bytes)

    @classmethod
    def of(cls, *arrays) -> "Storage":
        """Sum of the sizes of (count, itemsize) pairs or numpy arrays."""
        el = by = 0
        for a in arrays:
            if isinstance(a, tuple):
                n, item = a
            else:
                n, item = a.size, a.dtype.itemsize
            el += int(n)
            by += int(n) * int(item)
        return cls(el, by)


def im2col_storage(spec: Conv2DSpec) -> Storage:
    """im2col's lowered matrix: N x (C*Kh*Kw) x (Oh*Ow) float32."""
    n = spec.batch * spec.in_channels * spec.kernel_h * spec.kernel_w * spec.out_h * spec.out_w
    return Storage(n, 4 * n)


def mec_storage(spec: Conv2DSpec) -> Storage:
    """MEC's lowered matrix: N x Ow x (Hp*Kw*C) float32."""
    n = spec.batch * spec.out_w * spec.padded_h * spec.kernel_w * spec.in_channels
    return Storage(n, 4 * n)


def compression_ratios(spec: Conv2DSpec, s: Storage) -> dict:
    """CR against im2col and MEC, in elements and in bytes (higher = smaller than the baseline)."""
    i2c, mec = im2col_storage(spec), mec_storage(spec)
    div = lambda a, b: float(a) / b if b else float("inf")
    return {
        "cr_vs_im2col": div(i2c.elements, s.elements),
        "cr_vs_mec": div(mec.elements, s.elements),
        "cr_bytes_vs_im2col": div(i2c.bytes, s.bytes),
        "cr_bytes_vs_mec": div(mec.bytes, s.bytes),
    }
