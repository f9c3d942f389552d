"""BatchNormAsAffine: an inference batch norm the importer could not fold into a conv becomes
``x * scale + shift`` with per-channel constants.

A BatchNorm after a concat or before a ReLU and a conv (DenseNet's pre-activation layers) has
no conv before it to fold into, and TVM imports it as ``relax.nn.batch_norm``, an op of its
own: the rewrite (rewrite_conv2d._passes_blocks) cannot compute it in channel blocks, so every
such layer's neighbours changed layout around it (DenseNet: 33 transforms). As a multiply and
an add by N x C x 1 x 1 constants it is two elementwise ops, computed in blocks like the rest
and fused with the ReLU after it.

scale = gamma / sqrt(var + epsilon) and shift = beta - mean * scale are computed in float64
and rounded to float32 (onnxruntime computes a BatchNormalization the same way). Taken: the
first output of a batch_norm over axis 1 of a 4-D float32 tensor, not training, with constant
parameters; any other is left as it is.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..graph import const_value
from .main_mutator import mutate_main

_BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")


def affine_of(call: relax.Call) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift), each float32 of shape (1, C, 1, 1), of the batch_norm ``call``, when it
    is one this pass takes; else None."""
    if not isinstance(call, relax.Call) or call.op != _BATCH_NORM:
        return None
    a, x = call.attrs, call.args[0]
    ty = x.ty
    if bool(a.training) or int(a.axis) % 4 != 1 or not isinstance(ty, relax.TensorType) or ty.ndim != 4 \
            or ty.dtype != "float32":
        return None
    params = [const_value(p) for p in call.args[1:]]
    if any(p is None or p.ndim != 1 for p in params) or len({p.size for p in params}) != 1:
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = (gamma if bool(a.scale) else np.ones_like(gamma)) / np.sqrt(var + float(a.epsilon))
    shift = (beta if bool(a.center) else np.zeros_like(beta)) - mean * scale
    return tuple(v.astype(np.float32).reshape(1, -1, 1, 1) for v in (scale, shift))


@relax.expr_functor.mutator
class _Mutator(relax.PyExprMutator):
    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        if op.index == 0 and isinstance(op.tuple_value, relax.Var):
            bound = self.lookup_binding(op.tuple_value)
            affine = affine_of(bound) if bound is not None else None
            if affine is not None:
                x = self.visit_expr(bound.args[0])
                return relax.op.add(relax.op.multiply(x, relax.const(affine[0])), relax.const(affine[1]))
        return super().visit_tuple_getitem_(op)


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.BatchNormAsAffine")
def BatchNormAsAffine(mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named as TVM's are)
    """``main``'s inference batch norms as a multiply and an add; the batch_norm calls then unused
    dropped."""
    return relax.transform.DeadCodeElimination(["main"])(mutate_main(mod, _Mutator(mod)))
