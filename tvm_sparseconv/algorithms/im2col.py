"""im2col: lower the input to A (N x C*Kh*Kw x Oh*Ow), then one GEMM per image. Both TE."""
from __future__ import annotations

from tvm import te

from ..conv import Conv2DSpec, Epilogue
from ..reference import im2col_lower, im2col_multiply, im2col_storage
from .base import Buffer, Stage, bias_constant, register
from .lowering import Lowering, padded_read, te_epilogue


@register
class Im2col(Lowering):
    name = "im2col"

    def constants(self, spec, weight, bias, knobs):
        return {"w_mk": weight.reshape(spec.out_channels, -1), **bias_constant(spec, bias)}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        kh, kw = spec.kernel_h, spec.kernel_w
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        oh, ow, k = spec.out_h, spec.out_w, spec.in_channels * kh * kw
        x = te.placeholder(spec.x_shape, "float32", name="x")

        def lowered(n, row, p):
            c, l, q = row // (kh * kw), row % (kh * kw) // kw, row % kw
            return padded_read(spec, x, n, c, (p // ow) * sh + l * dh, (p % ow) * sw + q * dw)

        a = te.compute((spec.batch, k, oh * ow), lowered, name="a")
        lower = Stage("lower", "encode", te.create_prim_func([x, a]), ("x",),
                      (Buffer("a", (spec.batch, k, oh * ow)),), tunable=True)

        a_in = te.placeholder(a.shape, "float32", name="a")
        w = te.placeholder((spec.out_channels, k), "float32", name="w_mk")
        r = te.reduce_axis((0, k), name="k")
        y = te.compute(spec.y_shape, lambda n, m, h, v: te.sum(w[m, r] * a_in[n, r, h * ow + v], axis=r), name="gemm")
        y, ep_in, ep_names = te_epilogue(spec, y, epilogue)
        gemm = Stage("gemm", "multiply", te.create_prim_func([a_in, w, *ep_in, y]), ("a", "w_mk", *ep_names),
                     (Buffer("y", spec.y_shape),), tunable=True)
        return [lower, gemm]

    def lowered_storage(self, spec):
        return im2col_storage(spec)

    def reference(self, spec, knobs, x, w):
        return im2col_multiply(spec, im2col_lower(spec, x), w)
