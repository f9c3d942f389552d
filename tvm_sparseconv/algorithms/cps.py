"""cps: Compressed Pattern Sets (Amer et al.): CPO with the row indices packed in sets of 4.

Same traversal, values and value pointers as CPO (``cps_vals``, ``cps_vptr``); the rows
of each column are cut into aligned sets of 4 padded rows, a set with 3-4 NZEs stored as
one int32 entry (sign bit | base row << 4 | 4-bit mask), a set with 1-2 NZEs as its raw
rows (``cps_index``, sized for every input element; ``cps_iptr`` [N*C*ncols + 1] points
into it). The encoder and the multiply are CPO's (cpo_encoder.py, cpo_multiply.py) built
with ``packed=True``: the multiply decodes the entries on the fly into the same gather or
scatter. Shapes of every buffer: cpo_layout.py; docs/algorithms.md section 5 specifies the
format.
"""
from __future__ import annotations

from ..reference.cpo import CPS, column_order, cps_encode, cps_multiply, cps_storage
from .base import register
from .cpo import CPOAlgorithm


@register
class CPSAlgorithm(CPOAlgorithm):
    name = "cps"
    packed = True

    def unpack(self, spec, produced) -> CPS:
        p = produced
        nnz, nent = int(p["cps_vptr"][-1]), int(p["cps_iptr"][-1])
        return CPS(p["cps_vals"][:nnz], p["cps_index"][:nent], p["cps_vptr"], p["cps_iptr"],
                   column_order(spec))

    def encode_reference(self, spec, x) -> CPS:
        return cps_encode(spec, x)

    def format_storage(self, fmt):
        return cps_storage(fmt)

    def multiply_reference(self, spec, fmt, w):
        return cps_multiply(spec, fmt, w)

