"""TE helpers shared by the dense lowerings (im2col, MEC): padded reads, placeholders, epilogue."""
from __future__ import annotations

import tvm
from tvm import te

from ..conv import Conv2DSpec, Epilogue
from ..reference.storage import Storage
from .base import Algorithm, epilogue_value


def padded_read(spec: Conv2DSpec, x: te.Tensor, n, c, ih, iw):
    """x at padded coordinates (ih, iw), 0 in the padding."""
    pt, pl = spec.padding[0], spec.padding[1]
    inside = tvm.tirx.all(ih >= pt, ih < pt + spec.height, iw >= pl, iw < pl + spec.width)
    return tvm.tirx.if_then_else(inside, x[n, c, ih - pt, iw - pl], tvm.tirx.const(0.0, "float32"))


def te_epilogue(y: te.Tensor, bias: te.Tensor | None, epilogue: Epilogue) -> te.Tensor:
    """Bias + ReLU on an N x M x Oh x Ow TE tensor, as one elementwise stage."""
    if not (epilogue.bias or epilogue.relu):
        return y
    return te.compute(y.shape, lambda n, m, h, w: epilogue_value(y[n, m, h, w], m, bias, epilogue), name="y")


def te_bias(spec: Conv2DSpec, epilogue: Epilogue) -> tuple[list, tuple]:
    """The bias placeholder list and input-name tuple (both empty without a bias)."""
    if not epilogue.bias:
        return [], ()
    return [te.placeholder((spec.out_channels,), "float32", name="bias")], ("bias",)


class Lowering(Algorithm):
    """A dense lowering (im2col, MEC): its stored size follows from the shape alone; its stages
    are TE, which MetaSchedule tunes."""

    metaschedule = True

    def lowered_storage(self, spec: Conv2DSpec) -> Storage:
        raise NotImplementedError

    def storage(self, spec, knobs, produced):
        return self.lowered_storage(spec)

    def reference_storage(self, spec, knobs, x):
        return self.lowered_storage(spec)
