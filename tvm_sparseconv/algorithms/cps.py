"""cps: Compressed Pattern Sets (Amer et al.): CPO with the row indices packed in sets of 4.

CPO's traversal and values; the rows of each column are cut into aligned sets of 4 padded
rows, and each non-empty set is one int32 entry followed by its values' float32 bits, in one
stream per (image, channel, kept column) (``cps_stream``, ``cps_ptr`` [N*C*ncols + 1] into
it): a set with 2-4 NZEs is a flagged entry (sign bit | base row << 4 | 4-bit mask), a single
NZE its raw padded row. One pointer array and the entries interleaved with the values keep
CPS at or below CPO's stored elements on every input. The encoder and the multiply are
CPO's (cpo_encoder.py, cpo_multiply.py) built with ``packed=True``: the multiply decodes the
entries on the fly into the same gather or scatter. Shapes of every buffer: cpo_layout.py;
docs/algorithms.md section 5 specifies the format.
"""
from __future__ import annotations

from ..conv import Conv2DSpec
from ..reference.cpo import CPS, column_order, cps_encode, cps_multiply, cps_storage
from .base import Buffer, register
from .cpo import CPOAlgorithm
from .cpo_layout import Geometry


@register
class CPSAlgorithm(CPOAlgorithm):
    name = "cps"
    packed = True

    def format_buffers(self, spec: Conv2DSpec) -> tuple[Buffer, ...]:
        """The stream and its pointers (shapes: cpo_layout.py)."""
        g = Geometry(spec)
        return Buffer("cps_stream", (g.stream_cap,), "int32"), Buffer("cps_ptr", (g.groups + 1,), "int32")

    def unpack(self, spec, produced) -> CPS:
        p = produced
        return CPS(p["cps_stream"][:int(p["cps_ptr"][-1])], p["cps_ptr"], column_order(spec))

    def encode_reference(self, spec, x) -> CPS:
        return cps_encode(spec, x)

    def format_storage(self, fmt):
        return cps_storage(fmt)

    def multiply_reference(self, spec, fmt, w):
        return cps_multiply(spec, fmt, w)
