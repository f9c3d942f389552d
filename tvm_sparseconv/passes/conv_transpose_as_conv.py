"""ConvTransposeAsConv: a transposed conv becomes convs and a depth-to-space.

TVM legalizes ``relax.nn.conv2d_transpose`` to one loop nest that dilates the input with zeros
and is left unscheduled: a U-Net's 2 x 2 stride-2 up-convs took 1.6 s where onnxruntime takes
64 ms for the whole net. Written as convs, the layer runs on this project's conv kernels, is
planned and tuned like any other, and does no multiply by an inserted zero.

The sub-pixel identity, per spatial axis (stride s, kernel k, begin padding p):
y[Y] = sum over i, j with Y = i*s - p + j of x[i] * w[j]. Writing Y + p = q*s + r (0 <= r < s)
leaves the taps j = m*s + r, m = 0 .. T_r - 1 with T_r = ceil((k - r) / s), at the input pixel
i = q - m:

    y[q*s + r - p] = sum_m x[q - m] * w[m*s + r]

For each phase r that is a correlation of x with the phase's taps reversed, over a window of
T_r, stride 1. When k is a multiple of s every phase has the same window, and all s_h*s_w
phases (2-D) are one conv2d with O*s_h*s_w output channels, ordered (o, r_h, r_w) so that each
group's stay together; else each phase is a conv of its own (a common window would pad the
shorter phases with zero taps, which carry a NaN or Inf of x into outputs it does not reach),
concatenated as (r_h, r_w, o). The convs compute rows q = first .. last, first low enough that
no phase pads a negative amount before; a depth-to-space (reshape, permute, reshape)
interleaves the phases, and a slice drops the rows before p and after the output.

Shapes: x N x C x H x W (NCHW), w C x O/g x kh x kw (IOHW), output N x O x H' x W' with
H' = (H-1)*s - p_begin - p_end + k + output_padding; each conv's weight is OIHW, groups g.
Taken: float32, constant weight, dilation 1, kernel at least the stride (no phase without a
tap) and begin padding at most k - 1. Any other is left to TVM's legalization.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

from ..graph import const_value
from .main_mutator import mutate_main

_CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")


class _Axis(NamedTuple):
    """One spatial axis of the rewrite: phase r's conv padding before, the conv padding after
    (the same for every phase), the conv's output length, the rows the slice drops before, and
    the transposed conv's output length."""
    befores: list
    after: int
    conv_out: int
    drop: int
    out: int


def _axis(size: int, k: int, s: int, p0: int, p1: int, out_pad: int) -> _Axis | None:
    """The rewrite of one spatial axis; None when a phase has no tap (k < s) or the begin padding
    exceeds k - 1."""
    out = (size - 1) * s - p0 - p1 + k + out_pad
    if k < s or p0 > k - 1 or out <= 0:
        return None
    windows = [-(-(k - r) // s) for r in range(s)]  # phase r's taps: j = r, r + s, ... < k
    # rows q = first .. last; first is low enough that no phase's conv pads a negative amount
    first, last = min(p0 // s, min(windows) - 1), (out - 1 + p0) // s
    after = max(0, last + 1 - size)
    return _Axis([t - 1 - first for t in windows], after, size + after - first, p0 - first * s, out)


def phase_weight(w: np.ndarray, groups: int, phase) -> np.ndarray:
    """The OIHW weight (O, C/g, T_h, T_w) of phase ``phase`` = (r_h, r_w): the taps of the IOHW
    weight ``w`` (C, O/g, kh, kw) at r + m*s, reversed (a correlation), regrouped."""
    (rh, sh), (rw, sw) = phase
    c, og = w.shape[:2]
    taps = w[:, :, rh::sh, rw::sw][:, :, ::-1, ::-1]
    th, tw = taps.shape[2:]
    return np.ascontiguousarray(taps.reshape(groups, c // groups, og, th, tw).transpose(0, 2, 1, 3, 4)) \
        .reshape(groups * og, c // groups, th, tw)


def rewrite(call: relax.Call, emit) -> relax.Expr | None:
    """The conv2d + depth-to-space form of the conv2d_transpose ``call``, its steps but the last
    bound with ``emit`` (a BlockBuilder's), or None when this pass does not take it (module
    docstring)."""
    if not isinstance(call, relax.Call) or call.op != _CONV2D_TRANSPOSE:
        return None
    a, (x, wv) = call.attrs, call.args
    w = const_value(wv)
    ty = x.ty
    if (w is None or w.ndim != 4 or w.dtype != np.float32 or not isinstance(ty, relax.TensorType)
            or ty.ndim != 4 or ty.dtype != "float32" or a.data_layout != "NCHW" or a.kernel_layout != "IOHW"
            or a.out_layout != "NCHW" or any(int(d) != 1 for d in a.dilation)
            or (a.out_dtype and a.out_dtype not in ("", "float32"))):
        return None
    shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape]
    groups = int(a.groups)
    if None in shape or shape[1] % groups or w.shape[0] != shape[1]:
        return None
    n, _, h, wd = shape
    (sh, sw), pad, out_pad = ([int(v) for v in vs] for vs in (a.strides, a.padding, a.output_padding))
    ah, aw = (_axis(size, k, s, pad[i], pad[i + 2], out_pad[i])
              for i, (size, k, s) in enumerate(zip((h, wd), w.shape[2:], (sh, sw))))
    if ah is None or aw is None:
        return None
    o = w.shape[1] * groups
    phases = [(rh, rw) for rh in range(sh) for rw in range(sw)]
    weights = [phase_weight(w, groups, ((rh, sh), (rw, sw))) for rh, rw in phases]

    def conv(weight, rh, rw):
        return emit(relax.op.nn.conv2d(x, relax.const(weight), strides=1, groups=groups, out_dtype="float32",
                                       padding=[ah.befores[rh], aw.befores[rw], ah.after, aw.after]))

    u, v = ah.conv_out, aw.conv_out
    if len({wt.shape for wt in weights}) == 1:
        # k a multiple of s: one conv, channels (o, r_h, r_w), so that each group's are together
        y = conv(np.stack(weights, 1).reshape(o * sh * sw, *weights[0].shape[1:]), 0, 0)
        order, split = [0, 1, 4, 2, 5, 3], [n, o, sh, sw, u, v]
    else:  # a conv per phase, each with its own window (no zero taps: they would spread a NaN)
        y = emit(relax.op.concat([conv(wt, rh, rw) for wt, (rh, rw) in zip(weights, phases)], axis=1))
        order, split = [0, 3, 4, 1, 5, 2], [n, sh, sw, o, u, v]
    if (sh, sw) != (1, 1):
        y = emit(relax.op.permute_dims(emit(relax.op.reshape(y, split)), order))
        y = relax.op.reshape(y, [n, o, u * sh, v * sw])
    if (ah.drop, aw.drop, u * sh, v * sw) != (0, 0, ah.out, aw.out):
        y = relax.op.strided_slice(emit(y) if isinstance(y, relax.Call) else y, axes=[2, 3],
                                   begin=[ah.drop, aw.drop], end=[ah.drop + ah.out, aw.drop + aw.out])
    return y


@relax.expr_functor.mutator
class _Mutator(relax.PyExprMutator):
    def visit_call_(self, op: relax.Call) -> relax.Expr:
        op = super().visit_call_(op)
        new = rewrite(op, self.builder_.emit)
        return op if new is None else new


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.ConvTransposeAsConv")
def ConvTransposeAsConv(mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named as TVM's are)
    """``main``'s float32 NCHW conv2d_transposes as a conv2d and a depth-to-space each."""
    return relax.transform.DeadCodeElimination(["main"])(mutate_main(mod, _Mutator(mod)))
