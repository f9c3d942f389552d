"""Bilinear resize (``relax.image.resize2d``, method "linear") legalized as two passes over
index tables.

TVM legalizes a bilinear resize to one loop nest that, for each output element, recomputes
both source coordinates (a float floor and two clamps per axis, four times over) and gathers
four inputs: the DeepLab-like head's 21 x 56 x 56 -> 224 x 224 upsample took 1.0 ms in the
model, onnxruntime's Upsample 0.37 ms (AMD EPYC Zen 4). Here the source columns and weights
are computed once per output column into tables, then

    rows[n, c, y, j] = x[n, c, y, x0[j]] * (1 - wx[j]) + x[n, c, y, x1[j]] * wx[j]
    out[n, c, i, j]  = rows[n, c, y0(i), j] * (1 - wy(i)) + rows[n, c, y1(i), j] * wy(i)

for every input row y, then every output row i (its y0, y1 and wy are invariant along the row).
The second pass reads whole rows, so LLVM vectorises it for any ISA; the first gathers only
for the input rows (a quarter of the output's for a 4x upsample). The sums are TVM's own, in
its order (top, bottom, then between them), so the result is TVM's to the last bit wherever
LLVM contracts alike; NaN and Inf propagate as there (an Inf times a zero weight is NaN).

Taken: NCHW float32 with static shapes, the coordinate modes half_pixel, pytorch_half_pixel,
align_corners and asymmetric, and at most a 2x downscale in H (below that most rows would be
computed for nothing). Everything else keeps TVM's legalization. With align_corners an output
axis of size 1 samples the source's first pixel, as ONNX defines it (TVM's formula divides by
zero there).
"""
from __future__ import annotations

import tvm
from tvm import relax, s_tir, te

from ..stages import OPAQUE

MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def _f(v) -> tvm.tirx.PrimExpr:
    return tvm.tirx.const(v, "float32")


def source_coordinate(o: tvm.tirx.PrimExpr, in_size: int, out_size: int, mode: str) -> tvm.tirx.PrimExpr:
    """The float32 source coordinate of output index ``o`` along an axis of ``in_size`` ->
    ``out_size`` under ONNX's coordinate_transformation_mode ``mode``, computed as TVM's topi
    does (the scale is in / out)."""
    of = o.astype("float32")
    if mode == "align_corners":
        return of * _f((in_size - 1) / (out_size - 1)) if out_size > 1 else _f(0.0)
    if mode == "pytorch_half_pixel" and out_size == 1:
        return _f(0.0)
    scale = _f(in_size) / _f(out_size)
    return of * scale if mode == "asymmetric" else (of + _f(0.5)) * scale - _f(0.5)


def _taps(c: tvm.tirx.PrimExpr, size: int):
    """(first index, second index, weight of the second) of linear interpolation at float
    coordinate ``c`` on an axis of ``size``: indices clamped into it, as TVM clamps."""
    lo = tvm.tirx.floor(c).astype("int32")
    clamp = lambda i: tvm.tirx.max(tvm.tirx.min(i, size - 1), 0)  # noqa: E731
    return clamp(lo), clamp(lo + 1), c - lo.astype("float32")


def resize_compute(x: te.Tensor, out_h: int, out_w: int, mode: str) -> te.Tensor:
    """x (N, C, H, W) float32 -> (N, C, out_h, out_w), bilinear: the column tables x0, x1, wx
    (out_w), the row pass ``rows`` (N, C, H, out_w), then the output."""
    n, c, h, w = (int(v) for v in x.shape)
    col = lambda j: _taps(source_coordinate(j, w, out_w, mode), w)  # noqa: E731
    x0 = te.compute((out_w,), lambda j: col(j)[0], name="x0")
    x1 = te.compute((out_w,), lambda j: col(j)[1], name="x1")
    wx = te.compute((out_w,), lambda j: col(j)[2], name="wx")
    rows = te.compute((n, c, h, out_w), lambda b, k, y, j: x[b, k, y, x0[j]] * (_f(1.0) - wx[j])
                      + x[b, k, y, x1[j]] * wx[j], name="rows")

    def out(b, k, i, j):
        y0, y1, wy = _taps(source_coordinate(i, h, out_h, mode), h)
        return rows[b, k, y0, j] * (_f(1.0) - wy) + rows[b, k, y1, j] * wy

    return te.compute((n, c, out_h, out_w), out, name="resize")


def schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """resize_compute's PrimFunc scheduled: the row pass and the output each run in parallel
    over their (N, C, row) loops with the row inside, contiguous for LLVM to vectorise; the
    tables (one entry per output column) stay serial."""
    sch = s_tir.Schedule(func)
    for name in ("rows", "resize"):
        *outer, _ = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(*outer))
    return sch.mod["main"]


def _static(shape) -> list[int] | None:
    return [int(v) for v in shape] if all(isinstance(v, tvm.tirx.IntImm) for v in shape) else None


def takes(call: relax.Call) -> bool:
    """Whether the resize2d ``call`` is one this legalization computes (the module docstring)."""
    a, x = call.attrs, call.args[0]
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None or ty.ndim != 4:
        return False
    shape, size = _static(ty.shape.values), call.args[1]
    if shape is None or not isinstance(size, relax.ShapeExpr) or _static(size.values) is None:
        return False
    out_h, out_w = _static(size.values)
    return (str(a.layout) == "NCHW" and str(a.method) == "linear" and str(a.coordinate_transformation_mode) in MODES
            and str(a.out_dtype or "float32") in ("float32", "void") and min(shape + [out_h, out_w]) > 0
            and shape[2] <= 2 * out_h)


def legalize_map() -> dict:
    """{"relax.image.resize2d": legalization}: the two-pass kernel for the calls it takes
    (``takes``), TVM's own legalization for the rest."""
    default = tvm.ir.Op.get("relax.image.resize2d").get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not takes(call):
            return default(bb, call)
        x, shape = call.args[0], _static(call.args[0].ty.shape.values)
        out_h, out_w = _static(call.args[1].values)
        xt = te.placeholder(shape, "float32", name="x")
        y = resize_compute(xt, out_h, out_w, str(call.attrs.coordinate_transformation_mode))
        # scheduled here: ParallelizeRest and dlight leave it alone, FuseOps does not merge it
        func = schedule(te.create_prim_func([xt, y])).with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True})
        gv = bb.add_func(func.without_attr("global_symbol"), "resize2d_bilinear")
        return relax.call_tir(gv, [x], relax.TensorType([*shape[:2], out_h, out_w], "float32"))

    return {"relax.image.resize2d": legalize}
