"""cpo: Compressed Pattern Overlap (Amer et al.): store each NZE of the activation once.

The algorithm: its knobs, constants, stages and NumPy twins. The format is stored column by
column, each (image, channel, kept padded column) holding its NZEs by ascending padded row
(shapes and the weight layout in cpo_layout.py; docs/algorithms.md section 4 specifies the
format and both kernels). Two stages:

    encode    x, cols -> cpo_vals, cpo_rows, cpo_ptr           (cpo_encoder.py)
    multiply  cpo_vals, cpo_rows, cpo_ptr, cols, wt [, bias] -> y   (cpo_multiply.py)

CPS (cps.py) is this class with ``packed = True`` and its own format: the same kernels over
one stream per group, each set of 4 rows an entry followed by its values.

Knobs: multiply ("gather" | "scatter"), m_tile (output channels per vector block),
pixels (gather: output pixels per register block), chunks (gather: parallel tasks),
row_tile (scatter: output rows per accumulator block).
"""
from __future__ import annotations

import numpy as np

from ..conv import Conv2DSpec, Epilogue
from ..cpu import CPU
from ..reference.cpo import CPO, column_order, cpo_encode, cpo_multiply, cpo_storage
from ..reference.storage import Storage
from .base import Algorithm, Buffer, Stage, bias_constant, epilogue_inputs, grid, register, registers_ok
from .cpo_encoder import encoder
from .cpo_layout import MIN_TILE, Geometry, m_tiling, weight_layout
from .cpo_multiply import multiply, on_grid

# MIN_TILE, m_tiling, weight_layout, on_grid, encoder, multiply: importable from here as before the split
__all__ = ["CPOAlgorithm", "MIN_TILE", "encoder", "m_tiling", "multiply", "on_grid", "weight_layout"]


@register
class CPOAlgorithm(Algorithm):
    """CPO; :class:`~tvm_sparseconv.algorithms.cps.CPSAlgorithm` differs only in ``packed``."""

    name = "cpo"
    sparse = True
    fuses_residual = True
    packed = False
    knob_defaults = {"multiply": "gather", "m_tile": 64, "pixels": 4, "chunks": 2, "row_tile": 0}

    def default_knobs(self, spec: Conv2DSpec, cpu: CPU) -> dict:
        """Measured on the VGG layer (256x56x56, 3x3, M 256) on AVX-512: B4 x M64 = 16
        accumulators. The M tile is 4 vectors of the CPU; narrower M tiles get more pixels per
        block, up to cpu.accumulators registers; one task per core; the scatter's block is the
        whole image (row_tile = Oh)."""
        mt = m_tiling(spec.out_channels, 4 * cpu.lanes)[0]
        return dict(self.knob_defaults, m_tile=4 * cpu.lanes,
                    pixels=max(1, min(8, cpu.accumulators * cpu.lanes // mt)), chunks=cpu.cores,
                    row_tile=spec.out_h)

    def format_buffers(self, spec: Conv2DSpec) -> tuple[Buffer, ...]:
        """The encoder's outputs, the multiply's first inputs (shapes: cpo_layout.py)."""
        g = Geometry(spec)
        return (Buffer("cpo_vals", (g.cap,)), Buffer("cpo_rows", (g.cap,), "int32"),
                Buffer("cpo_ptr", (g.groups + 1,), "int32"))

    def constants(self, spec, weight, bias, knobs):
        mt, mp = m_tiling(spec.out_channels, int(knobs["m_tile"]))
        return {"cols": Geometry(spec).cols_constant(), "wt": weight_layout(np.asarray(weight, np.float32), mt, mp),
                **bias_constant(spec, bias)}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        fmt = self.format_buffers(spec)
        names = tuple(b.name for b in fmt)
        return [
            Stage("encode", "encode", encoder(spec, self.packed), ("x", "cols"), fmt),
            Stage("multiply", "multiply", multiply(spec, epilogue, knobs, self.packed),
                  names + ("cols", "wt") + epilogue_inputs(epilogue),
                  (Buffer("y", spec.y_shape),)),
        ]

    def knob_grid(self, spec, cpu):
        for k in grid(multiply=("gather",), m_tile=(32, 64), pixels=(2, 4, 8)):
            if registers_ok(cpu, k["pixels"], k["m_tile"]):
                yield k
        yield from grid(multiply=("scatter",), m_tile=(32, 64), row_tile=(0, 8))

    # -- the format as NumPy arrays -------------------------------------------------------
    def unpack(self, spec: Conv2DSpec, produced) -> CPO:
        """The valid prefix of what the compiled encoder produced, as the reference's CPO."""
        p = produced
        nnz = int(p["cpo_ptr"][-1])
        return CPO(p["cpo_vals"][:nnz], p["cpo_rows"][:nnz], p["cpo_ptr"], column_order(spec))

    def encode_reference(self, spec: Conv2DSpec, x: np.ndarray) -> CPO:
        return cpo_encode(spec, x)

    def format_storage(self, fmt) -> Storage:
        return cpo_storage(fmt)

    def multiply_reference(self, spec, fmt, w):
        return cpo_multiply(spec, fmt, w)

    def storage(self, spec, knobs, produced):
        return self.format_storage(self.unpack(spec, produced))

    def reference_storage(self, spec, knobs, x):
        return self.format_storage(self.encode_reference(spec, x))

    def reference(self, spec, knobs, x, w):
        return self.multiply_reference(spec, self.encode_reference(spec, x), w)

