"""exp, log, sigmoid, SiLU, tanh and erf legalized to loops that vectorize (tir_math.py says why and
how they are computed).

``legalize_map()`` is the customize_legalize_map of relax.transform.LegalizeOps.
"""
from __future__ import annotations

import tvm
from tvm import relax, te

from ..tir_math import erf_of, exp_of, log_of, sigmoid_of, tanh_of

# op -> (name, the float32 value of an element x in vectorizable TIR)
_ELEMENTWISE = {"relax.exp": ("exp", exp_of),
                "relax.log": ("log", log_of),
                "relax.sigmoid": ("sigmoid", sigmoid_of),
                "relax.nn.silu": ("silu", lambda x: x * sigmoid_of(x)),
                "relax.tanh": ("tanh", tanh_of),
                "relax.erf": ("erf", erf_of)}


def legalize_map() -> dict:
    """{op name: legalization} for float32 exp, log, sigmoid, SiLU, tanh and erf; other dtypes keep TVM's."""
    return {op: _only_float32(name, value_of, op) for op, (name, value_of) in _ELEMENTWISE.items()}


def _only_float32(name: str, value_of, op_name: str):
    """A legalization: a call_te of ``value_of`` on each element for a float32 input, TVM's
    own for any other."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if call.args[0].ty.dtype != "float32":
            return default(bb, call)
        return bb.call_te(lambda t: te.compute(t.shape, lambda *i: _bound(value_of, t(*i)), name=name), call.args[0],
                          primfunc_name_hint=f"tir_{name}")

    return legalize


def _bound(value_of, x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """``value_of(x)`` with x bound to a variable once: the functions read their argument many
    times, and once a chain of them is inlined into one loop (Mish's tanh of a log of an exp)
    the copies multiply: unbound, the build of a CSPDarknet-like net with Mish ran out of 24 GB."""
    v = tvm.tirx.Var("x", "float32")
    return tvm.tirx.Let(v, x, value_of(v))
