"""TE helpers shared by the dense lowerings (im2col, MEC): padded reads, placeholders, epilogue."""
from __future__ import annotations

import tvm
from tvm import te

from ..conv import Conv2DSpec, Epilogue
from ..reference.storage import Storage
from .base import Algorithm, epilogue_inputs, epilogue_value


def padded_read(spec: Conv2DSpec, x: te.Tensor, n, c, ih, iw):
    """x at padded coordinates (ih, iw), 0 in the padding."""
    pt, pl = spec.padding[0], spec.padding[1]
    inside = tvm.tirx.all(ih >= pt, ih < pt + spec.height, iw >= pl, iw < pl + spec.width)
    return tvm.tirx.if_then_else(inside, x[n, c, ih - pt, iw - pl], tvm.tirx.const(0.0, "float32"))


def te_epilogue(spec: Conv2DSpec, y: te.Tensor, epilogue: Epilogue) -> tuple[te.Tensor, list, tuple]:
    """The epilogue (bias, residual, ReLU, clip: conv.Epilogue) on an N x M x Oh x Ow TE tensor
    as one elementwise stage.

    Returns (the output, the epilogue's placeholders, their input names): ``bias`` (M) and ``res``
    (N x M x Oh x Ow) when used, in base.epilogue_inputs' order; ``y`` itself when there is
    nothing to apply.
    """
    names = epilogue_inputs(epilogue)
    shapes = {"bias": (spec.out_channels,), "res": spec.y_shape}
    ph = {n: te.placeholder(shapes[n], "float32", name=n) for n in names}
    if epilogue == Epilogue():
        return y, [], ()
    out = te.compute(y.shape, lambda n, m, h, w: epilogue_value(y[n, m, h, w], m, ph.get("bias"), epilogue,
                                                                ph.get("res"), (n, m, h, w)), name="y")
    return out, [ph[n] for n in names], names


class Lowering(Algorithm):
    """A dense lowering (im2col, MEC): its stored size follows from the shape alone; its stages
    are TE, which MetaSchedule tunes."""

    metaschedule = True
    fuses_residual = True

    def lowered_storage(self, spec: Conv2DSpec) -> Storage:
        raise NotImplementedError

    def storage(self, spec, knobs, produced):
        return self.lowered_storage(spec)

    def reference_storage(self, spec, knobs, x):
        return self.lowered_storage(spec)
