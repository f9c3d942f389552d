"""MEC (Cho & Brand): compact lowering L (N x Ow x Hp x Kw x C), then Oh small GEMMs over
overlapping row windows of L (solution B: one per image and output row). Both TE."""
from __future__ import annotations

from tvm import te

from ..conv import Conv2DSpec, Epilogue
from ..reference import mec_lower, mec_multiply, mec_storage
from .base import Buffer, Stage, bias_constant, register
from .lowering import Lowering, padded_read, te_epilogue


@register
class MEC(Lowering):
    name = "mec"

    def constants(self, spec, weight, bias, knobs):
        # K' = (kh, kw, c) x M
        return {"w_lqcm": weight.transpose(2, 3, 1, 0), **bias_constant(spec, bias)}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        kh, kw, c = spec.kernel_h, spec.kernel_w, spec.in_channels
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        hp, ow = spec.padded_h, spec.out_w
        x = te.placeholder(spec.x_shape, "float32", name="x")
        shape = (spec.batch, ow, hp, kw, c)
        lowered = te.compute(shape, lambda n, v, h, q, ci: padded_read(spec, x, n, ci, h, v * sw + q * dw), name="l")
        lower = Stage("lower", "encode", te.create_prim_func([x, lowered]), ("x",), (Buffer("l", shape),),
                      tunable=True)

        l_in = te.placeholder(shape, "float32", name="l")
        w = te.placeholder((kh, kw, c, spec.out_channels), "float32", name="w_lqcm")
        rl, rq, rc = te.reduce_axis((0, kh), "rl"), te.reduce_axis((0, kw), "rq"), te.reduce_axis((0, c), "rc")
        y = te.compute(spec.y_shape, lambda n, m, r, v: te.sum(
            l_in[n, v, r * sh + rl * dh, rq, rc] * w[rl, rq, rc, m], axis=[rl, rq, rc]), name="gemm")
        y, ep_in, ep_names = te_epilogue(spec, y, epilogue)
        gemm = Stage("gemm", "multiply", te.create_prim_func([l_in, w, *ep_in, y]), ("l", "w_lqcm", *ep_names),
                     (Buffer("y", spec.y_shape),), tunable=True)
        return [lower, gemm]

    def lowered_storage(self, spec):
        return mec_storage(spec)

    def reference(self, spec, knobs, x, w):
        return mec_multiply(spec, mec_lower(spec, x), w)
