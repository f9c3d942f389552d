"""direct: TVM's own dense conv2d (topi), the baseline. MetaSchedule tunes it."""
from __future__ import annotations

from tvm import te, topi

from ..conv import Conv2DSpec, Epilogue
from ..reference import dense_conv2d
from ..reference.storage import Storage
from .base import Algorithm, Buffer, Stage, bias_constant, register
from .lowering import te_epilogue


@register
class Direct(Algorithm):
    name = "direct"
    metaschedule = True
    fuses_residual = True
    groups = True  # topi covers groups, dilation, strides and asymmetric padding

    def constants(self, spec, weight, bias, knobs):
        return {"w": weight, **bias_constant(spec, bias)}

    def build_stages(self, spec: Conv2DSpec, epilogue: Epilogue, knobs, cpu=None) -> list[Stage]:
        x = te.placeholder(spec.x_shape, "float32", name="x")
        w = te.placeholder(spec.w_shape, "float32", name="w")
        if spec.groups == 1:
            y = topi.nn.conv2d_nchw(x, w, spec.stride, spec.padding, spec.dilation)
        else:
            y = topi.nn.group_conv2d_nchw(x, w, spec.stride, spec.padding, spec.dilation, spec.groups)
        y, ep_in, ep_names = te_epilogue(spec, y, epilogue)
        return [Stage("conv2d", "multiply", te.create_prim_func([x, w, *ep_in, y]), ("x", "w", *ep_names),
                      (Buffer("y", spec.y_shape),), tunable=True)]

    def storage(self, spec, knobs, produced):
        return Storage(0, 0)  # reads the activation in place: nothing is stored

    def reference_storage(self, spec, knobs, x):
        return Storage(0, 0)

    def reference(self, spec, knobs, x, w):
        return dense_conv2d(spec, x, w)
