"""direct: TVM's own dense conv2d (topi), the baseline. MetaSchedule tunes it."""
from __future__ import annotations

import numpy as np
from tvm import te, topi

from ..conv import Conv2DSpec, Epilogue
from ..reference import dense_conv2d
from ..reference.storage import Storage
from .base import Algorithm, Buffer, Stage, bias_constant, epilogue_value


def te_epilogue(y: te.Tensor, bias: te.Tensor | None, epilogue: Epilogue) -> te.Tensor:
    """Bias + ReLU on an N x M x Oh x Ow TE tensor, as one elementwise stage."""
    if not (epilogue.bias or epilogue.relu):
        return y
    return te.compute(y.shape, lambda n, m, h, w: epilogue_value(y[n, m, h, w], m, bias, epilogue), name="y")


def te_bias_placeholder(spec: Conv2DSpec, epilogue: Epilogue):
    return te.placeholder((spec.out_channels,), "float32", name="bias") if epilogue.bias else None


class Direct(Algorithm):
    name = "direct"
    sparse = False

    def check(self, spec: Conv2DSpec) -> None:
        pass  # topi covers groups, dilation, strides and asymmetric padding

    def constants(self, spec, weight, bias, knobs):
        return {"w": weight, **bias_constant(spec, bias)}

    def stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs) -> list[Stage]:
        x = te.placeholder(spec.x_shape, "float32", name="x")
        w = te.placeholder(spec.w_shape, "float32", name="w")
        bias = te_bias_placeholder(spec, epilogue)
        if spec.groups == 1:
            y = topi.nn.conv2d_nchw(x, w, spec.stride, spec.padding, spec.dilation)
        else:
            y = topi.nn.group_conv2d_nchw(x, w, spec.stride, spec.padding, spec.dilation, spec.groups)
        y = te_epilogue(y, bias, epilogue)
        args = [x, w] + ([bias] if bias is not None else []) + [y]
        inputs = ("x", "w") + (("bias",) if bias is not None else ())
        return [Stage("conv2d", "multiply", te.create_prim_func(args), inputs,
                      (Buffer("y", spec.y_shape),), tunable=True)]

    def storage(self, spec, knobs, produced):
        return Storage(0, 0)  # reads the activation in place: nothing is stored

    def reference_storage(self, spec, knobs, x):
        return Storage(0, 0)

    def reference(self, spec, knobs, x, w):
        return dense_conv2d(spec, x, w)


ALGORITHM = Direct()
