"""SinkReshapes: an elementwise op on reshaped tensors computed before the reshape instead.

torch's ONNX export of a Linear over an NHWC map (ConvNeXt's MLP, any channels-last block)
flattens the pixels, multiplies, and reshapes back: ``reshape(matmul(reshape(x)) + b)``; the
GELU after it then runs on the 4-d view, and the next Linear flattens it again. Relax fuses a
matmul only with the elementwise ops that follow it directly, so each GELU was a function of
its own, a pass over the whole activation (1.2 of ConvNeXt's 13 ms on an AMD EPYC Zen 4).

Here ``op(reshape(a, s), c)`` becomes ``reshape(op(a, c), s)`` for an elementwise op whose
other operands are scalars or reshapes of tensors of a's shape to the same s, so the chain
moves in front of the reshape, and relax's RemoveRedundantReshape then drops the pair of
reshapes around it. The values are the same: an elementwise op does not see the shape.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.transform import RemoveRedundantReshape

from .main_mutator import mutate_main

_RESHAPE = tvm.ir.Op.get("relax.reshape")
# ops that compute each output element from the same element of each operand (and scalars)
_ELEMENTWISE = {tvm.ir.Op.get(f"relax.{name}") for name in (
    "add", "subtract", "multiply", "divide", "power", "maximum", "minimum", "erf", "exp", "tanh", "sigmoid",
    "sqrt", "rsqrt", "negative", "abs", "clip", "nn.relu", "nn.silu", "nn.gelu", "nn.gelu_tanh")}


def _shape(expr) -> list | None:
    """The static shape of a tensor expression, or None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape]
    except (TypeError, AttributeError):  # a symbolic dimension
        return None


def _is_scalar(expr) -> bool:
    """A 0-d tensor: it broadcasts to any shape without adding dimensions."""
    return _shape(expr) == []


@relax.expr_functor.mutator
class _Mutator(relax.PyExprMutator):
    def _reshaped(self, expr):
        """(source, target shape) when ``expr`` is a variable bound to reshape(source, shape)."""
        if not isinstance(expr, relax.Var):
            return None
        value = self.lookup_binding(expr)
        if isinstance(value, relax.Call) and value.op == _RESHAPE:
            return value.args[0], value.args[1]
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op not in _ELEMENTWISE:
            return call
        call = self.builder_.normalize(call)  # its type: the output's shape
        views = [self._reshaped(a) for a in call.args]
        first = next((v for v in views if v is not None), None)
        if first is None or _shape(call) is None:
            return call
        source_shape = _shape(first[0])
        if source_shape is None:
            return call
        args = []
        for a, v in zip(call.args, views):
            if v is None and _is_scalar(a):
                args.append(a)
            elif v is not None and _shape(v[0]) == source_shape and _shape(a) == _shape(call):
                args.append(v[0])
            else:  # a tensor operand that broadcasts, or a reshape of another shape: left as it is
                return call
        inner = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
        return relax.op.reshape(inner, first[1])


@tvm.transform.module_pass(opt_level=0, name="tvm_sparseconv.SinkReshapes")
def SinkReshapes(mod: tvm.IRModule, ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named as TVM's are)
    """``main``'s elementwise ops in front of the reshapes they read; pairs of reshapes merged."""
    mod = RemoveRedundantReshape()(mutate_main(mod, _Mutator(mod)))
    return relax.transform.DeadCodeElimination(["main"])(mod)
