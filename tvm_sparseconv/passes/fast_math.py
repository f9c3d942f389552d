"""exp, log, sigmoid, SiLU, tanh, erf and a power by a constant legalized to loops that
vectorize (tir_math.py says why and how they are computed).

``legalize_map()`` is the customize_legalize_map of relax.transform.LegalizeOps.
"""
from __future__ import annotations

import tvm
from tvm import relax, te

from ..graph import const_value
from ..tir_math import bound, erf_of, exp_of, log_of, pow_of, sigmoid_of, tanh_of

# op -> (name, the float32 value of an element x in vectorizable TIR)
_ELEMENTWISE = {"relax.exp": ("exp", exp_of),
                "relax.log": ("log", log_of),
                "relax.sigmoid": ("sigmoid", sigmoid_of),
                "relax.nn.silu": ("silu", lambda x: x * sigmoid_of(x)),
                "relax.tanh": ("tanh", tanh_of),
                "relax.erf": ("erf", erf_of)}


def legalize_map() -> dict:
    """{op name: legalization} for float32 exp, log, sigmoid, SiLU, tanh, erf and a power by a
    scalar constant; other dtypes keep TVM's."""
    return {**{op: _only_float32(name, value_of, op) for op, (name, value_of) in _ELEMENTWISE.items()},
            "relax.power": _power}


def _power(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """x ** c for a float32 x and a scalar constant c (tir_math.pow_of); TVM's own (a libm
    powf per element) for anything else."""
    x, c = call.args
    value = const_value(c)
    if x.ty.dtype != "float32" or value is None or value.size != 1 or call.ty.shape is None \
            or list(call.ty.shape) != list(x.ty.shape):
        return tvm.ir.Op.get("relax.power").get_attr("FLegalize")(bb, call)
    c = float(value.reshape(()))
    return bb.call_te(lambda t: te.compute(t.shape, lambda *i: bound(t(*i), lambda v: pow_of(v, c)), name="pow"), x,
                      primfunc_name_hint="tir_pow")


def _only_float32(name: str, value_of, op_name: str):
    """A legalization: a call_te of ``value_of`` on each element for a float32 input, TVM's
    own for any other."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if call.args[0].ty.dtype != "float32":
            return default(bb, call)
        return bb.call_te(lambda t: te.compute(t.shape, lambda *i: bound(t(*i), value_of), name=name), call.args[0],
                          primfunc_name_hint=f"tir_{name}")

    return legalize
