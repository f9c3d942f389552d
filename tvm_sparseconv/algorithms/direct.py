"""direct: TVM's own dense conv2d (topi), the baseline. MetaSchedule tunes it."""
from __future__ import annotations

from tvm import te, topi

from ..conv import Conv2DSpec, Epilogue
from ..reference import dense_conv2d
from ..reference.storage import Storage
from .base import Algorithm, Buffer, Stage, bias_constant, register
from .lowering import te_bias, te_epilogue


@register
class Direct(Algorithm):
    name = "direct"
    metaschedule = True
    groups = True  # topi covers groups, dilation, strides and asymmetric padding

    def constants(self, spec, weight, bias, knobs):
        return {"w": weight, **bias_constant(spec, bias)}

    def stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        x = te.placeholder(spec.x_shape, "float32", name="x")
        w = te.placeholder(spec.w_shape, "float32", name="w")
        bias, bias_in = te_bias(spec, epilogue)
        if spec.groups == 1:
            y = topi.nn.conv2d_nchw(x, w, spec.stride, spec.padding, spec.dilation)
        else:
            y = topi.nn.group_conv2d_nchw(x, w, spec.stride, spec.padding, spec.dilation, spec.groups)
        y = te_epilogue(y, bias[0] if bias else None, epilogue)
        return [Stage("conv2d", "multiply", te.create_prim_func([x, w, *bias, y]), ("x", "w", *bias_in),
                      (Buffer("y", spec.y_shape),), tunable=True)]

    def storage(self, spec, knobs, produced):
        return Storage(0, 0)  # reads the activation in place: nothing is stored

    def reference_storage(self, spec, knobs, x):
        return Storage(0, 0)

    def reference(self, spec, knobs, x, w):
        return dense_conv2d(spec, x, w)
